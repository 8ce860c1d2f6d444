"""Autotuning configs for the fused GEMM / implicit-GEMM conv kernels, per GPU generation.

``INTERPRET`` is read once, at import (Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
before this package is imported). Under the interpreter every config list collapses to ONE config: ``@triton.autotune``
with several configs needs ``do_bench``, which fails there ("0 active drivers"), and large tiles keep interpreted runs
fast (interpreter cost grows with programs x loop steps).

Hopper (sm_90: H100/H200) gets larger tiles and more warps / stages than Ampere (sm_80/86); other archs use the Ampere
list. Configs that do not fit the device's shared memory for the operand dtype, or would spill, are pruned per launch
(``prune_configs``); the autotune key buckets the batch dimension (``m_bucket``). The elementwise epilogue and
backward kernels are not autotuned: their tiles come from ``elementwise_tiles``.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Ahead-of-time verification (bench/aot_verify.py) compiles the kernels for a GPU this machine does not have: it
# names the target here ("9.0", "8.0") before importing the kernels, so that the config lists and the pruning are
# exactly the ones that GPU would get at run time. Never set in normal use.
TARGET_CAPABILITY_ENV = "WFNET_TARGET_CAPABILITY"


def _capability():
    target = os.environ.get(TARGET_CAPABILITY_ENV)
    if target:
        try:
            major, minor = (int(v) for v in target.split("."))
        except ValueError:
            raise ValueError(f"{TARGET_CAPABILITY_ENV} must look like '9.0', got {target!r}") from None
        return (major, minor)
    if INTERPRET:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability()
    except Exception:  # no driver: configs are irrelevant, kernels cannot launch anyway
        pass
    return None


CAPABILITY = _capability()


def epilogue_subtiles(bm: int, bn: int, warps: int) -> int:
    """Column blocks the GEMM epilogue is split into (``epilogue.gate_store``): enough that each block's gathered
    gate / gated-bias tiles hold at most 16 fp32 values per thread (1, 2 or 4 blocks, each at least 16 columns)."""
    per_thread = bm * bn // (warps * 32)
    s = 1
    while s < 4 and per_thread // s > 16 and bn // (2 * s) >= 16:
        s *= 2
    return s


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group,
                          "EPILOGUE_SUBTILES": epilogue_subtiles(bm, bn, warps)},
                         num_warps=warps, num_stages=stages)


_HOPPER = [
    _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(128, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),  # small K: the NCHW implicit-GEMM conv's gather (see fits_registers)
    # 8 input-tile elements / thread: unaligned operands. In full-precision fp32 convs on sm_90, 64x64x16 (any
    # stages) and 64x32x16 with 4 stages spilled 4 B at 96-168 registers (Triton 3.8), 64x32x16 with 3 stages 8 B at
    # 128 registers (Triton 3.6); 32x64x32 s4 and 64x32x16 s2 did not (bench/aot_verify.py, 2026-12-05)
    _cfg(32, 64, 32, 4, 4), _cfg(64, 32, 16, 4, 2),
]
_AMPERE = [
    _cfg(128, 256, 32, 8, 3), _cfg(256, 128, 32, 8, 3), _cfg(128, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 4), _cfg(128, 32, 32, 4, 4), _cfg(64, 32, 32, 2, 5),
    _cfg(64, 32, 32, 4, 4),  # 16 accumulators: full-precision fp32 convs (see fits_registers)
    _cfg(64, 64, 16, 4, 4), _cfg(64, 32, 16, 4, 4),  # 8 input-tile elements / thread: unaligned operands
]
_INTERPRETER = [_cfg(64, 64, 32, 4, 1)]


# WFNET_AUTOTUNE=0 keeps only the first (generally good) config: GPU test runs skip the tuning compile time.
AUTOTUNE = os.environ.get("WFNET_AUTOTUNE", "1") != "0"

# Shared memory per block when the device cannot be asked (opt-in maximum): H100/H200 227 KB, A100 163 KB.
_SMEM_FALLBACK = {9: 232_448, 8: 166_912}


def gemm_configs() -> list:
    """Configs for the fused linear GEMM and the implicit-GEMM conv (same tile parameters)."""
    if INTERPRET:
        return list(_INTERPRETER)
    configs = _HOPPER if CAPABILITY is not None and CAPABILITY[0] >= 9 else _AMPERE
    if AUTOTUNE:
        return list(configs)
    return [single_config(configs)]


def single_config(configs):
    """The one config ``WFNET_AUTOTUNE=0`` runs with, out of the arch's list ``configs``. Triton skips
    early_config_prune for a single config, so it must fit fp32 operands in this device's shared memory and compile
    spill-free in every dtype and layout, full-precision fp32 included (the strictest). bench/aot_verify.py compiles
    it for every launch beside the pruned configs."""
    limit = smem_limit(0) if CAPABILITY is not None else _SMEM_FALLBACK[9]
    fitting = [c for c in configs if smem_bytes(c, 4) <= limit
               and all(fits_registers(c, 4, "ieee", gather, aligned=aligned)
                       for gather in (None, "NHWC", "NCHW") for aligned in (True, False))]
    return (fitting or [min(configs, key=lambda c: (accumulators_per_thread(c), smem_bytes(c, 4)))])[0]


def smem_bytes(config, elem_bytes: int) -> int:
    """Shared memory one config's pipelined A and B tiles need: (BM*BK + BK*BN) * element size * stages."""
    k = config.kwargs
    return (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * elem_bytes * config.num_stages


def accumulators_per_thread(config) -> int:
    """fp32 accumulator registers per thread; above ~128 the kernel spills (255 registers per thread in all)."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (config.num_warps * 32)


def smem_limit(device) -> int:
    if os.environ.get(TARGET_CAPABILITY_ENV):  # compiling for a named target: its table, not this machine's GPU
        return _SMEM_FALLBACK.get(CAPABILITY[0], 101_376)
    try:
        import torch

        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except Exception:  # no driver / older torch: the table for the architecture
        return _SMEM_FALLBACK.get(CAPABILITY[0] if CAPABILITY else 8, 101_376)


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune``: drop the configs whose tiles do not fit the device's shared memory for this dtype
    (fp32 128x256x64 with 3 stages needs 288 KB; an H100 has 227 KB per block) or that would spill registers
    (``fits_registers``). Keeps the config with the fewest accumulators when none fits."""
    x = named_args["x_ptr"]
    limit = smem_limit(x.device)
    gather = None if "C_INNER" not in kwargs else ("NHWC" if kwargs["C_INNER"] else "NCHW")
    precision = kwargs.get("INPUT_PRECISION", "ieee")
    aligned = operands_aligned(named_args)
    fits = [c for c in configs if smem_bytes(c, x.element_size()) <= limit
            and fits_registers(c, x.element_size(), precision, gather, aligned=aligned)]
    return fits or [min(configs, key=lambda c: (accumulators_per_thread(c), smem_bytes(c, x.element_size())))]


# the GEMM dimensions whose rows the kernels load / store: K and N of the linear GEMM, C_in and C_out of the conv
_ALIGN_DIMS = ("K", "N", "C_in", "C_out")


def operands_aligned(named_args) -> bool:
    """Whether the launch's operand rows are 16-element aligned, as Triton's specialisation sees them: every GEMM
    dimension in ``_ALIGN_DIMS`` a multiple of 16 (they are the row strides of x, W and the output) and every
    tensor's data pointer 16-byte aligned. Otherwise loads are not vectorised and the pipelined tiles are held
    element by element with their own offsets and masks (``fits_registers``' ``aligned``)."""
    for name in _ALIGN_DIMS:
        v = named_args.get(name)
        if isinstance(v, int) and v % 16:
            return False
    return all(t.data_ptr() % 16 == 0 for name, t in named_args.items()
               if name.endswith("_ptr") and hasattr(t, "data_ptr"))


def fits_registers(config, elem_bytes: int, input_precision: str, conv_gather: str | None,
                   major: int | None = None, aligned: bool = True) -> bool:
    """Whether ``config`` compiles without register spills, by the limits measured with bench/aot_verify.py for
    sm_90 and sm_80 (bench/results/aot_*; tests/test_aot_compile.py re-checks every surviving config on every CI run).

    * fp32 accumulators per thread (BLOCK_M x BLOCK_N / threads): at most 128 with tensor-core operands (fp16, bf16,
      TF32; TF32 on sm_80 64), 32 for full-precision fp32, whose ``tl.dot`` runs on FMA units and keeps operand
      fragments in registers.
    * the implicit-GEMM conv also builds its [BLOCK_M, BLOCK_K] input tile and [BLOCK_K, BLOCK_N] weight tile from
      per-element offsets and masks: channels_last (``conv_gather`` "NHWC") needs at most 64 accumulators and 32
      weight-tile elements per thread on sm_90 (the ResNet-18 1x1 downsample spilled at 128 accumulators and at
      64x128x64; full-precision fp32 32 accumulators and 16 input-tile elements), on sm_80 64 accumulators (32 with
      4-byte operands) and 16 weight-tile elements (64x128x32 spilled 20-24 B in TF32), 16 accumulators for
      full-precision fp32; NCHW (scalar gathers) at most 32 accumulators and 16 input-tile elements per thread on
      both (64x64x64 spilled 32-652 B on sm_90, 128x32x32 132-264 B on sm_80), 16 accumulators in full-precision
      fp32, aligned or not (64x64x16 with a folded GELU spilled 12 B at 255 registers on sm_80 with Triton 3.6).
    * unaligned operands (``aligned`` False, see ``operands_aligned``: a K / N / C_in / C_out not a multiple of 16,
      e.g. a 3-channel stem conv, or a misaligned pointer): at most 32 accumulators and 8 input-tile elements per
      thread, every kernel, dtype and layout (measured on both archs: every config with 16 input-tile elements
      spilled in some dtype, 64x64x16 / 64x32x16 / 32x64x32 none).
    Measured with bench/aot_verify.py --suite full (bench/results/aot_*_2026-12-05).
    ``major`` is the compute capability's major version (default: this process's target)."""
    major = major if major is not None else (CAPABILITY[0] if CAPABILITY else 8)
    threads = config.num_warps * 32
    acc = accumulators_per_thread(config)
    a_tile = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] // threads
    b_tile = config.kwargs["BLOCK_K"] * config.kwargs["BLOCK_N"] // threads
    full_fp32 = elem_bytes == 4 and input_precision == "ieee"
    if not aligned:
        # full-precision fp32 NCHW: 64x64x16 with a folded GELU spilled 12 B at 255 registers on sm_80 (Triton 3.6)
        return acc <= (16 if full_fp32 and conv_gather == "NCHW" else 32) and a_tile <= 8
    if conv_gather == "NCHW":
        # full-precision fp32: 64x64x16 with a folded GELU spilled 12 B at 255 registers on sm_80 (Triton 3.6)
        return acc <= (16 if full_fp32 else 32) and a_tile <= 16
    if conv_gather == "NHWC":
        if major >= 9:
            if full_fp32:
                return acc <= 32 and a_tile <= 16 and b_tile <= 32
            return acc <= 64 and b_tile <= 32
        if full_fp32:
            return acc <= 16 and b_tile <= 16
        return acc <= (32 if elem_bytes == 4 else 64) and b_tile <= 16
    if full_fp32:
        return acc <= 32
    # TF32 on sm_80: triton 3.6 (the GPU machine's) spilled 20-68 B at 128 accumulators; 3.8 did not
    return acc <= (64 if elem_bytes == 4 and major < 9 else 128)


def m_bucket(m: int) -> int:
    """The autotune key's batch dimension, bucketed to a power of two (>= 64) so a new batch size does not re-tune."""
    return max(64, triton.next_power_of_2(max(int(m), 1)))


def elementwise_tiles(c: int, p: int, channels_contiguous: bool, total: int | None = None,
                      max_c: int = 128) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for the gate epilogue / backward kernels over a [B, C, P] view: the contiguous dim gets
    the long side of a ``total``-element tile (default ~4K; 2K under the interpreter: fewer, larger numpy ops win
    there too), at most ``max_c`` channels when channels are contiguous (the backward asks for 1K x 64, see
    backward.py)."""
    total = total or (2048 if INTERPRET else 4096)
    if channels_contiguous:
        bc = min(triton.next_power_of_2(max(c, 1)), max_c)
        bp = min(triton.next_power_of_2(max(p, 1)), max(total // bc, 1))
    else:
        bp = min(triton.next_power_of_2(max(p, 1)), 512)
        bc = min(triton.next_power_of_2(max(c, 1)), max(total // bp, 1))
    return max(bc, 2), max(bp, 2)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles share the same weight column tiles
    while those are hot in L2 (the standard Triton matmul schedule)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_size, (pid % group) // group_size
