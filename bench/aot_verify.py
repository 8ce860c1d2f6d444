"""Ahead-of-time GPU verification: compile every Triton kernel variant for sm_90 / sm_80 on a machine without a GPU.

No GPU is needed to know whether a kernel compiles for a target, how many registers it uses, whether it spills and how
much shared memory it needs: Triton's compiler and the ``ptxas`` inside the Triton wheel produce all of it. What makes
this a check of the *runtime's* kernels, not of a hand-written signature, is that every variant is produced by the
project's own launch wrappers (``wf_kernels.linear.linear_forward``, ``conv2d.conv2d_forward``,
``epilogue.gate_forward``, ``backward.gate_backward``, ``gates.class_grad``) called on CPU tensors of the real shapes,
dtypes and layouts:

* a stand-in Triton driver reports the target GPU (``GPUTarget("cuda", 90 | 80, 32)``), so the launcher binds the
  arguments and specialises them exactly as at run time (``stride == 1``, divisibility by 16, constexprs);
* ``knobs.runtime.jit_cache_hook`` receives each specialisation right before Triton would compile and launch it; the
  hook compiles it for the target with ptxas's ``-v`` log captured, records registers, spills and shared memory, and
  tells Triton to skip the launch;
* ``Autotuner.run`` is replaced by a loop over the configs that survive the project's pruning
  (``autotune.prune_configs``) for that launch: every config the autotuner could pick on that GPU is compiled.

The process must be started with ``WFNET_TARGET_CAPABILITY`` (e.g. "9.0") and ``TRITON_INTERPRET=0`` set before
``wf_kernels`` is imported (the config lists are chosen at import); ``main`` re-executes itself that way per arch.

    python bench/aot_verify.py --arch 90 80 --suite full --out bench/results      # the table (.md + .json)
    python bench/aot_verify.py --arch 90 --suite ci --json /tmp/aot90.json         # what the test runs

The Triton internals used here (the driver object, ``jit_cache_hook``'s keyword arguments, ``Autotuner.prune_configs``,
``knobs.nvidia.dump_ptxas_log``) are checked first: a Triton whose internals differ fails with a message naming what
is missing, never with a silent pass. The CUDA extension's kernels are checked the same way with
``nvcc -Xptxas -v`` (``csrc_usage``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import enum
import inspect
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Per-block shared memory limit (opt-in maximum) and per-SM resources of the targets (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): H100 / H200 = sm_90, A100 = sm_80.
TARGETS = {
    90: dict(gpu="H100 / H200 (sm_90)", smem_per_block=232_448, smem_per_sm=233_472, regs_per_sm=65_536,
             max_threads_per_sm=2048, max_blocks_per_sm=32),
    80: dict(gpu="A100 (sm_80)", smem_per_block=166_912, smem_per_sm=167_936, regs_per_sm=65_536,
             max_threads_per_sm=2048, max_blocks_per_sm=32),
}
# The Triton internals used below (the driver object, ``jit_cache_hook`` and its keyword arguments, the ``compile``
# dict it receives, ``Autotuner.prune_configs``, ``knobs.nvidia.dump_ptxas_log``) were read, and a CI suite compiled,
# in these version families: 3.8 (the project's) and 3.6 (the GPU machine's). Another family fails with a message.
SUPPORTED_TRITON = ("3.6", "3.8")
HOOK_KWARGS = {"key", "repr", "fn", "compile", "is_manual_warmup", "already_compiled"}
COMPILE_KEYS = {"signature", "constants", "configs", "num_warps", "num_stages", "num_ctas", "enable_fp_fusion"}


class AOTUnavailable(RuntimeError):
    """This Triton does not offer what ahead-of-time verification relies on (the message says what)."""


# ------------------------------------------------------------------------------------------------ resource usage
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores / loads and stack frame from a ``ptxas -v`` log of ONE function. Raises when the log
    does not hold them (a changed ptxas output format must not read as 'no spills')."""
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise AOTUnavailable(f"ptxas -v log has no {key!r} line; the log was:\n{log}")
        out[key] = int(m.group(1))
    return out


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_BRANCH = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`?\(?\.?\w*\)?\s*)?0x([0-9a-f]+)")
_SASS_LOCAL = re.compile(r"\b(?:STL|LDL)(?:\.[\w.]+)?\b")


def local_memory_in_loops(sass: str) -> dict:
    """Where a kernel's register spills (local-memory loads / stores, STL / LDL) sit in its SASS: ``in_loops`` counts
    those inside a loop body (an address range closed by a backward branch), which run every iteration, and
    ``outside`` those that run once per program. ptxas -O3 spills a few bytes on purpose to reach an occupancy
    target (a register 'parked' across the main loop, e.g. a shared-memory scratch address for the reduction after
    it): it costs one store and one load per program, not per iteration."""
    instrs, loops = [], []
    for m in _SASS_LINE.finditer(sass):
        addr, text = int(m.group(1), 16), m.group(2)
        instrs.append((addr, text))
        b = _SASS_BRANCH.search(text)
        if b and int(b.group(1), 16) <= addr:
            loops.append((int(b.group(1), 16), addr))
    if not instrs:
        raise AOTUnavailable("cuobjdump -sass printed no instructions: the SASS format changed")
    local = [a for a, t in instrs if _SASS_LOCAL.search(t)]
    inside = [a for a in local if any(lo <= a <= hi for lo, hi in loops)]
    return dict(in_loops=len(inside), outside=len(local) - len(inside), loops=len(loops))


def sass_of(cubin: bytes) -> str:
    """The SASS of a cubin, by the cuobjdump that ships with this Triton (or CUDA's)."""
    tool = None
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        pass
    tool = tool or shutil.which("cuobjdump")
    if not tool or not os.path.exists(tool):
        raise AOTUnavailable("cuobjdump not found (it ships in triton/backends/nvidia/bin): spills cannot be placed")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AOTUnavailable(f"cuobjdump -sass failed: {proc.stderr[-2000:]}")
    return proc.stdout


def blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM (occupancy): the least of the register, shared-memory, thread and block limits.
    Registers are allocated per warp in units of 256."""
    t = TARGETS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = t["regs_per_sm"] // (regs_per_warp * num_warps)
    by_smem = t["smem_per_sm"] // shared if shared else t["max_blocks_per_sm"]
    by_threads = t["max_threads_per_sm"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, t["max_blocks_per_sm"]))


# ------------------------------------------------------------------------------------- the stand-in driver / hooks
def _check_triton():
    import triton
    from triton import knobs

    version = ".".join(triton.__version__.split(".")[:2])
    missing = []
    if not hasattr(knobs, "runtime") or not hasattr(knobs.runtime, "jit_cache_hook"):
        missing.append("triton.knobs.runtime.jit_cache_hook")
    if not hasattr(knobs, "nvidia") or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        missing.append("triton.knobs.nvidia.dump_ptxas_log")
    try:
        from triton.runtime.autotuner import Autotuner
        if not hasattr(Autotuner, "prune_configs"):
            missing.append("Autotuner.prune_configs")
    except ImportError:
        missing.append("triton.runtime.autotuner.Autotuner")
    try:
        from triton.runtime.driver import driver
        if not hasattr(driver, "set_active"):
            missing.append("triton.runtime.driver.driver.set_active")
    except ImportError:
        missing.append("triton.runtime.driver")
    if missing:
        raise AOTUnavailable(f"triton {triton.__version__} lacks what AOT verification uses: {', '.join(missing)} "
                             f"(read in triton {', '.join(SUPPORTED_TRITON)}); update bench/aot_verify.py")
    if version not in SUPPORTED_TRITON and not os.environ.get("WFNET_AOT_ANY_TRITON"):
        raise AOTUnavailable(f"triton {triton.__version__}: bench/aot_verify.py relies on Triton internals read in "
                             f"the {', '.join(SUPPORTED_TRITON)} families only; check _install's driver / hook / "
                             f"Autotuner use against this version, then add {version!r} to SUPPORTED_TRITON "
                             f"(WFNET_AOT_ANY_TRITON=1 tries anyway)")
    return version


def _install(arch: int, records: list, seen: dict):
    """Point Triton at the target ``arch`` and make every launch compile-and-record instead of launching."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    class TargetOnlyDriver(DriverBase):
        """Answers what binding and compiling ask (target, device 0, stream 0); anything that would run refuses."""

        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_device_interface(self):
            raise AOTUnavailable("ahead-of-time verification cannot run kernels")

        def get_benchmarker(self):
            raise AOTUnavailable("ahead-of-time verification cannot benchmark kernels")

        def get_empty_cache_for_benchmark(self):
            raise AOTUnavailable("ahead-of-time verification cannot benchmark kernels")

        def clear_cache(self, cache):
            pass

    driver.set_active(TargetOnlyDriver())
    knobs.nvidia.dump_ptxas_log = True
    state = {"case": None, "role": "launch", "config_filter": None}
    triton_version = triton.__version__

    tile_params = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SUBTILES", "BLOCK_C", "BLOCK_P"}

    def hook(**kw):
        if set(kw) != HOOK_KWARGS or not COMPILE_KEYS <= set(kw["compile"]):
            raise AOTUnavailable(f"triton's jit_cache_hook was called with {sorted(kw)} / compile keys "
                                 f"{sorted(kw.get('compile', {}))}; bench/aot_verify.py reads {sorted(HOOK_KWARGS)} / "
                                 f"{sorted(COMPILE_KEYS)}: update it for this Triton")
        fn, c = kw["fn"], kw["compile"]
        jit_fn = fn.jit_function
        variant = (fn.name, str(kw["key"]), c["num_warps"], c["num_stages"])
        case, role = state["case"], state["role"]
        if variant in seen:  # the same specialisation from another case: compiled once, listed for both
            rec = records[seen[variant]]
            if case["name"] not in rec["cases"]:
                rec["cases"].append(case["name"])
            rec["roles"] = sorted(set(rec["roles"]) | {role})
            return True
        src = ASTSource(jit_fn, c["signature"], c["constants"], c["configs"][0])
        options = dict(num_warps=c["num_warps"], num_stages=c["num_stages"], num_ctas=c["num_ctas"],
                       enable_fp_fusion=c["enable_fp_fusion"])
        log = io.StringIO()
        t0 = time.perf_counter()
        error = None
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as e:  # a variant that does not compile is a finding, recorded as such
            kernel, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        consts = {name: c["constants"][(i,)] for i, name in enumerate(jit_fn.arg_names) if (i,) in c["constants"]}
        declared = [p.name for p in jit_fn.params if p.is_constexpr]
        rec = dict(kernel=fn.name, arch=arch, triton=triton_version, cases=[case["name"]], dtype=case["dtype"],
                   layout=case["layout"], wrapper_args=dict(case.get("extra", {})), roles=[role],
                   constexprs={k: v for k, v in consts.items() if isinstance(v, (int, float, str, bool))},
                   # the kernel's own constexpr parameters other than the tile (HAS_GB, STORE_Z, ACT, ...): every
                   # one a kernel declares shows up here without this script naming it
                   variant={k: consts[k] for k in declared if k in consts and k not in tile_params
                            and isinstance(consts[k], (int, float, str, bool))},
                   num_warps=c["num_warps"], num_stages=c["num_stages"], compile_s=round(time.perf_counter() - t0, 2),
                   error=error)
        if kernel is not None:
            rec.update(parse_ptxas_log(log.getvalue()))
            rec["shared"] = int(kernel.metadata.shared)
            rec["blocks_per_sm"] = blocks_per_sm(arch, rec["registers"], rec["shared"], c["num_warps"])
            if rec["spill_stores"] or rec["spill_loads"]:  # where: every iteration, or once per program
                rec["local_memory"] = local_memory_in_loops(sass_of(kernel.asm["cubin"]))
            dump = os.environ.get("WFNET_AOT_DUMP")  # a folder: the PTX of every spilling variant, to read
            if dump and (rec["spill_stores"] or rec["spill_loads"]):
                Path(dump).mkdir(parents=True, exist_ok=True)
                (Path(dump) / f"{fn.name}_sm{arch}_{len(records)}.ptx").write_text(kernel.asm["ptx"])
        seen[variant] = len(records)
        records.append(rec)
        if os.environ.get("WFNET_AOT_PROGRESS"):
            print(f"[{len(records)}] {rec['kernel']} {rec['dtype']} {rec['layout']} {_config_label(rec)} "
                  f"{_variant_label(rec)} {rec.get('registers')} regs {rec.get('spill_stores')} B spilled "
                  f"{rec['compile_s']} s", file=sys.stderr, flush=True)
        return True  # compiled and recorded: Triton must not launch

    knobs.runtime.jit_cache_hook = hook
    from wf_kernels.autotune import single_config

    def run_every_pruned_config(self, *args, **kwargs):
        """Every config the pruner keeps for this launch, then the WFNET_AUTOTUNE=0 config (which Triton runs
        unpruned for every launch); ``state["config_filter"]`` narrows the list in the CI suite's second pass."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            pruned = self.prune_configs(kwargs)
            default = single_config(self.configs)
            todo = [(cfg, "pruned") for cfg in pruned] + [(default, "autotune0")]
            keep = state.get("config_filter")
            for cfg, role in todo:
                if keep is not None and not keep(self.base_fn.__name__, cfg, role):
                    continue
                state["role"] = role
                self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            self.nargs = None
            state["role"] = "launch"

    Autotuner.run = run_every_pruned_config
    return state


# ------------------------------------------------------------------------------------------------------ the cases
DTYPES = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")


def _torch_dtype(name):
    import torch
    return {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}[name]


# (name, batch, C_in, H, W, C_out, kernel, stride, padding, bias): ResNet-18 stem / 3x3 / strided 1x1 downsample
# (no bias: followed by BatchNorm), VGG-16 first and deep 3x3 (bias), and one small odd shape.
CONV_SHAPES = [
    ("resnet18.conv1", 2, 3, 64, 64, 64, 7, 2, 3, False),
    ("resnet18.layer1.conv", 2, 64, 14, 14, 64, 3, 1, 1, False),
    ("resnet18.layer2.downsample", 2, 64, 14, 14, 128, 1, 2, 0, False),
    ("vgg16.features.0", 2, 3, 32, 32, 64, 3, 1, 1, True),
    ("vgg16.features.24", 2, 512, 7, 7, 512, 3, 1, 1, True),
    ("odd", 3, 5, 9, 11, 7, 3, 1, 1, True),
]
# The CI suite (the test's time budget: a GEMM variant takes 0.3-1.5 s to compile on a 2-core machine) keeps every
# kernel x surviving config x dtype x arch with the largest epilogue (bias gate + stored z), on a deep 3x3 conv in
# channels_last and, for fp32 and bf16, also NCHW; the 1x1 strided downsample in channels_last (its weight gather
# spilled where the 3x3 did not) and the odd shape (unaligned operands: few configs survive) in every dtype;
# "full" compiles every shape x layout x variant.
_ALL = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
CI_CONV_VARIANTS = ({("vgg16.features.24", True, "NHWC", dt) for dt in _ALL}
                    | {("vgg16.features.24", True, "NCHW", dt) for dt in ("fp32-ieee", "bf16")}
                    | {("resnet18.layer2.downsample", True, "NHWC", dt) for dt in _ALL}
                    | {("odd", True, layout, dt) for dt in _ALL for layout in ("NHWC", "NCHW")})
# the "ci" suite's values of discovered wrapper arguments, where it keeps a subset ("full" compiles every value): the
# folded activations "none", the most common (ReLU) and the longest epilogue / backward math (GELU: erf and exp; it
# held the most register pressure of the seven in the full sweeps, bench/results/aot_full_*)
CI_WRAPPER_VALUES = {"act": ("none", "relu", "gelu")}
# (name, batch, tokens, in, out, bias): ViT-S qkv (197 tokens, 384 -> 1152) and an odd shape without bias.
LINEAR_SHAPES = [
    ("vit_small.qkv", 2, 197, 384, 1152, True),
    ("odd", 3, 5, 37, 50, False),
]


def _enumerable(hint):
    """Every value a parameter annotated ``hint`` can take, or None: bool, typing.Literal[...], an enum.Enum
    subclass, and any of them Optional."""
    if hint is bool:
        return (False, True)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return tuple(args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _enumerable(rest[0] if len(rest) == 1 else typing.Union[tuple(rest)])
        return None if inner is None else (None, *inner)
    return None


def wrapper_choices(fn, handled) -> dict:
    """{parameter: values, default first} for every parameter of the launch wrapper ``fn`` that a case does not
    set itself (``handled``). This is how a variant added to a wrapper later (an activation, a folded epilogue: any
    argument that picks a constexpr) gets compiled without this script naming it. A parameter whose values cannot
    be enumerated from its annotation raises: it must be annotated (bool, typing.Literal[...], an enum.Enum,
    Optional of these) or set by the case, never silently left at its default."""
    fn = getattr(fn, "_init_fn", fn)  # a torch.library.custom_op: the Python function it was made from
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # an annotation that does not evaluate: say which wrapper
        raise AOTUnavailable(f"cannot read the annotations of {fn.__module__}.{fn.__qualname__}: {e}") from e
    out = {}
    for name, p in sig.parameters.items():
        if name in handled or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        values = _enumerable(hints.get(name))
        if values is None:
            raise AOTUnavailable(
                f"launch wrapper {fn.__module__}.{fn.__qualname__}: parameter {name!r} "
                f"(annotation {hints.get(name, p.annotation)!r}) is not set by bench/aot_verify.py's cases and its "
                f"values cannot be enumerated; annotate it bool, typing.Literal[...] or an enum.Enum (Optional "
                f"allowed), or set it in the case, so every kernel variant it selects is compiled")
        if p.default is not p.empty and p.default in values:
            values = (p.default, *[v for v in values if v != p.default])
        out[name] = values
    return out


def _suite_values(choices: dict, suite: str) -> dict:
    """``choices`` narrowed to ``CI_WRAPPER_VALUES`` in the "ci" suite (a value the wrapper no longer takes is an
    error: the CI subset must be kept in step with the code)."""
    if suite != "ci":
        return choices
    out = dict(choices)
    for name, keep in CI_WRAPPER_VALUES.items():
        if name in out:
            unknown = set(keep) - set(out[name])
            if unknown:
                raise AOTUnavailable(f"CI_WRAPPER_VALUES[{name!r}] lists {sorted(unknown)}, which the launch wrapper "
                                     f"does not take (it takes {list(out[name])})")
            out[name] = tuple(v for v in out[name] if v in keep)
    return out


def _combos(choices: dict) -> list[dict]:
    """Every combination of the discovered wrapper arguments, the all-defaults one first."""
    names = list(choices)
    return [dict(zip(names, vals)) for vals in itertools.product(*(choices[n] for n in names))]


def _cases(suite: str):
    """Every launch as a dict (name, dtype, layout, wrapper, handled, thunk): ``thunk(**extra)`` calls the project's
    launch wrapper ``wrapper``, setting the parameters in ``handled`` itself and passing ``extra`` (the discovered
    ones, ``wrapper_choices``). ``suite`` "ci" keeps the training variant (z stored: the largest epilogue) of the
    linear shapes and of the convs in ``CI_CONV_VARIANTS``, "full" every shape, layout and mode."""
    import torch
    from wf_kernels.backward import gate_backward
    from wf_kernels.conv2d import conv2d_forward
    from wf_kernels.epilogue import gate_forward
    from wf_kernels.gates import class_grad, segments
    from wf_kernels.linear import linear_forward

    cases = []

    def add(name, dtype, layout, wrapper, handled, thunk):
        cases.append(dict(name=name, dtype=dtype, layout=layout, wrapper=wrapper, handled=set(handled), thunk=thunk))

    lin_args = ("x3", "weight", "g", "gb", "path", "save_z", "precision")
    conv_args = ("x", "weight", "g", "gb", "stride", "padding", "dilation", "groups", "path", "save_z", "precision")
    save_z_options = (True, False)
    for dname in DTYPES:
        dt = _torch_dtype(dname)
        precision = "tf32" if dname == "fp32-tf32" else "ieee"
        for name, b, t, k, n, has_bias in LINEAR_SHAPES:
            for save_z in save_z_options:
                if suite == "ci" and not save_z:
                    continue  # ci: the largest epilogue (stored z) of the real and of the unaligned shape

                def thunk(b=b, t=t, k=k, n=n, has_bias=has_bias, dt=dt, save_z=save_z, precision=precision, **extra):
                    x = torch.empty(b, t, k, dtype=dt)
                    w = torch.empty(n, k, dtype=dt)
                    g = torch.empty(b, n)
                    linear_forward(x, w, g, torch.empty(b, n) if has_bias else None, "gemm", save_z, precision,
                                   **extra)
                add(f"linear {name} {'train' if save_z else 'infer'}", dname, "tokens", linear_forward, lin_args,
                    thunk)
        for layout in ("NCHW", "NHWC"):
            fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
            for name, b, ci, h, w_, co, ks, st, pad, has_bias in CONV_SHAPES:
                for save_z in save_z_options:
                    if suite == "ci" and (name, save_z, layout, dname) not in CI_CONV_VARIANTS:
                        continue

                    def thunk(b=b, ci=ci, h=h, w_=w_, co=co, ks=ks, st=st, pad=pad, has_bias=has_bias, dt=dt,
                              fmt=fmt, save_z=save_z, precision=precision, **extra):
                        x = torch.empty(b, ci, h, w_, dtype=dt).contiguous(memory_format=fmt)
                        w = torch.empty(co, ci, ks, ks, dtype=dt).contiguous(memory_format=fmt)
                        g = torch.empty(b, co)
                        conv2d_forward(x, w, g, torch.empty(b, co) if has_bias else None, (st, st), (pad, pad),
                                       (1, 1), 1, "implicit_gemm", save_z, precision, **extra)
                    add(f"conv2d {name} {'train' if save_z else 'infer'}", dname, layout, conv2d_forward, conv_args,
                        thunk)
        if dname == "fp32-tf32":
            continue  # the elementwise kernels have no dot: TF32 does not apply
        # the separate gate pass and its backward, on conv outputs (both layouts) and linear outputs
        for lname, shape, fmt, cdim in (("NCHW", (2, 64, 14, 14), torch.contiguous_format, 1),
                                        ("NHWC", (2, 64, 14, 14), torch.channels_last, 1),
                                        ("tokens", (2, 197, 1152), torch.contiguous_format, -1),
                                        ("NCHW", (3, 7, 9, 11), torch.contiguous_format, 1)):
            c = shape[cdim]
            for has_bias in (True, False):
                def thunk(shape=shape, fmt=fmt, cdim=cdim, c=c, dt=dt, has_bias=has_bias, **extra):
                    z = torch.empty(shape, dtype=dt).contiguous(memory_format=fmt) if len(shape) == 4 else \
                        torch.empty(shape, dtype=dt)
                    g = torch.empty(shape[0], c)
                    gate_forward(z, g, torch.empty(shape[0], c) if has_bias else None, cdim, **extra)
                add(f"gate pass {shape}", dname, lname, gate_forward, ("z", "g", "gb", "channel_dim"), thunk)

            def bwd(shape=shape, fmt=fmt, cdim=cdim, c=c, dt=dt, **extra):
                z = torch.empty(shape, dtype=dt).contiguous(memory_format=fmt) if len(shape) == 4 else \
                    torch.empty(shape, dtype=dt)
                go = torch.empty_like(z)
                g = torch.empty(shape[0], c)
                folded = extra.get("act", "none") != "none"  # a folded activation needs z for every gradient
                for gb in (None, torch.empty(shape[0], c)):  # the gated bias of a folded BatchNorm, or none
                    for need in ((True, True, True), (False, True, True), (True, False, False)):
                        gate_backward(go, z if need[1] or folded else z.new_empty(0), g, cdim, *need, gb=gb,
                                      **extra)
            add(f"gate backward {shape}", dname, lname, gate_backward,
                ("grad_out", "z", "g", "channel_dim", "need_gz", "need_g", "need_gb", "gb"), bwd)

    def class_thunk(**extra):
        rows = torch.tensor([3, 1, 3, 0, 2])
        perm, starts = segments(rows, 10)
        class_grad(torch.empty(5, 1152), torch.empty(10, 1152), perm, starts, **extra)
    add("class grad", "fp32", "-", class_grad, ("grad_g", "alpha", "perm", "starts"), class_thunk)
    return cases


def _cfg_label(kwargs, num_warps, num_stages):
    return f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']} w{num_warps} s{num_stages}"


def compile_for(arch: int, suite: str, only: str | None = None) -> list[dict]:
    """In THIS process (started with WFNET_TARGET_CAPABILITY and TRITON_INTERPRET=0): every variant, recorded.

    Pass 1 runs every case with the launch wrappers' default arguments; pass 2 every other combination of the
    discovered wrapper arguments (``wrapper_choices``: e.g. an activation). In the "ci" suite pass 2 compiles, per
    kernel, case, dtype and layout, the config that needed the most registers in pass 1 (the one closest to
    spilling) and the WFNET_AUTOTUNE=0 config; "full" compiles every surviving config in both passes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise AOTUnavailable("TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled")
    if not os.environ.get("TRITON_CACHE_DIR", "").startswith(tempfile.gettempdir()):
        # a kernel found in Triton's disk cache is not re-assembled: no ptxas log, nothing to read
        raise AOTUnavailable("start the process with TRITON_CACHE_DIR set to a fresh temporary folder")
    if os.environ.get("WFNET_TARGET_CAPABILITY") != f"{arch // 10}.{arch % 10}":
        raise AOTUnavailable(f"start the process with WFNET_TARGET_CAPABILITY={arch // 10}.{arch % 10} "
                             f"(the kernels' config lists are chosen at import)")
    _check_triton()
    sys.path.insert(0, str(ROOT))
    records, seen = [], {}
    state = _install(arch, records, seen)
    cases = [cs for cs in _cases(suite) if not only or only in f"{cs['name']} {cs['dtype']} {cs['layout']}"]
    combos = {id(cs): _combos(_suite_values(wrapper_choices(cs["wrapper"], cs["handled"]), suite)) for cs in cases}
    for cs in cases:  # pass 1: the defaults
        state["case"] = dict(name=cs["name"], dtype=cs["dtype"], layout=cs["layout"], extra={})
        cs["thunk"](**combos[id(cs)][0])
    if not records:
        raise AOTUnavailable("no kernel variant was captured: the launch interception did not fire")
    if suite == "ci":  # pass 2 keeps, per (kernel, case, dtype, layout), pass 1's most register-hungry config
        top = {}
        for r in records:
            if "BLOCK_M" not in r["constexprs"] or r.get("error"):
                continue
            for case_name in r["cases"]:
                k = (r["kernel"], case_name, r["dtype"], r["layout"])
                if k not in top or r["registers"] > top[k][0]:
                    top[k] = (r["registers"], _cfg_label(r["constexprs"], r["num_warps"], r["num_stages"]))

        def keep(kernel, cfg, role):
            c = state["case"]
            best = top.get((kernel, c["name"], c["dtype"], c["layout"]))
            return role == "autotune0" or best is None or \
                best[1] == _cfg_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)
        state["config_filter"] = keep
    for cs in cases:  # pass 2: every other combination of the discovered wrapper arguments
        for extra in combos[id(cs)][1:]:
            state["case"] = dict(name=cs["name"], dtype=cs["dtype"], layout=cs["layout"], extra=extra)
            cs["thunk"](**extra)
    state["config_filter"] = None
    return records


# ----------------------------------------------------------------------------------------------- the CUDA extension
def csrc_usage(archs=(90, 80), nvcc: str | None = None) -> list[dict]:
    """Compile ``csrc/wf_kernels.cu`` for each arch with ``nvcc -Xptxas -v`` (the flags setup.py uses) and return
    per kernel instantiation: registers, spills, shared memory. Raises FileNotFoundError without nvcc."""
    nvcc = nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        raise FileNotFoundError("nvcc not found (PATH or /usr/local/cuda/bin)")
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parents[1]))  # torch's guess can land on /usr/local
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    incs = [f"-I{p}" for p in include_paths(device_type="cuda")]
    with tempfile.TemporaryDirectory() as tmp:
        # torch's own nvcc flags (what setup.py's CUDAExtension passes) plus setup.py's extra ones
        cmd = [nvcc, "-c", str(ROOT / "csrc" / "wf_kernels.cu"), "-o", os.path.join(tmp, "k.o"), "-O3",
               "--use_fast_math", "-std=c++20", *COMMON_NVCC_FLAGS, "-Xptxas", "-v", *gencode, *incs,
               "-DTORCH_EXTENSION_NAME=_C"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out, current = [], None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = dict(kernel=_demangle(m.group(1)), arch=int(m.group(2)[3:]), spill_stores=None)
            out.append(current)
            continue
        if current is None:
            continue
        if (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(s.group(1)) if s else 0
    if not out or any(r.get("spill_stores") is None or "registers" not in r for r in out):
        raise AOTUnavailable(f"could not read nvcc's ptxas -v output:\n{proc.stderr[-4000:]}")
    return out


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if not filt:
        return name
    return subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name


# ------------------------------------------------------------------------------------------------------- reporting
def violations(records: list[dict]) -> list[str]:
    """Every variant that fails to compile, spills, or exceeds its target's per-block shared memory."""
    bad = []
    for r in records:
        where = f"{r['kernel']} sm_{r['arch']} triton {r.get('triton', '?')} {r.get('dtype', '')} {r.get('layout', '')} " \
                f"w{r.get('num_warps', '')} s{r.get('num_stages', '')} {r.get('constexprs', '')}"
        if r.get("error"):
            bad.append(f"does not compile: {where}: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads at {r['registers']} "
                       f"registers ({r.get('local_memory')}): {where}")
        if r["shared"] > TARGETS[r["arch"]]["smem_per_block"]:
            bad.append(f"shared memory {r['shared']} B > {TARGETS[r['arch']]['smem_per_block']} B: {where}")
    return bad


def _config_label(r):
    c = r.get("constexprs", {})
    if "BLOCK_M" in c:  # "(A0)": the config WFNET_AUTOTUNE=0 runs with
        return _cfg_label(c, r["num_warps"], r["num_stages"]) + (" (A0)" if "autotune0" in r.get("roles", ()) else "")
    blocks = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK"))
    return f"{blocks} w{r['num_warps']}"


def _variant_label(r):
    """The kernel's own non-tile constexprs (flags set true, other values as name=value) and the discovered wrapper
    arguments that are not at their defaults."""
    v = r.get("variant", {})
    parts = [k for k, val in v.items() if val is True]
    parts += [f"{k}={val}" for k, val in v.items() if not isinstance(val, bool)]
    parts += [f"{k}={val}" for k, val in r.get("wrapper_args", {}).items()]
    return " ".join(parts) or "-"


def write_table(records: list[dict], csrc: list[dict] | None, out_dir: Path, tag: str, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"aot_{tag}"
    json_path, md_path = base.parent / f"{base.name}.json", base.parent / f"{base.name}.md"  # a tag may hold dots
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, triton=records, csrc=csrc), f, indent=1)
    lines = [f"# Ahead-of-time compile of the GPU kernels ({tag})", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; triton {meta['triton']}, "
             f"torch {meta['torch']}; ptxas from the Triton wheel). No GPU ran anything: these are the compiler's "
             f"numbers for the targets.", ""]
    bad = violations(records) + [f"csrc {r['kernel']} sm_{r['arch']} spills {r['spill_stores']} B"
                                 for r in (csrc or []) if r["spill_stores"] or r["spill_loads"]]
    for arch, tv in sorted({(r["arch"], r.get("triton", "")) for r in records}, reverse=True):
        rs = [r for r in records if r["arch"] == arch and r.get("triton", "") == tv]
        ok = [r for r in rs if not r.get("error")]
        spilling = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        lines.append(f"- sm_{arch} ({TARGETS[arch]['gpu']}), triton {tv}: {len(rs)} variants, {len(rs) - len(ok)} fail to "
                     f"compile, {len(spilling)} spill"
                     + (f" ({min(r['spill_stores'] for r in spilling)}-{max(r['spill_stores'] for r in spilling)} B "
                        f"spill stores)" if spilling else "")
                     + f", shared memory max {max((r['shared'] for r in ok), default=0):,} B of "
                       f"{TARGETS[arch]['smem_per_block']:,} B per block, registers max "
                       f"{max((r['registers'] for r in ok), default=0)}; the WFNET_AUTOTUNE=0 config (A0) in "
                       f"{sum(1 for r in rs if 'autotune0' in r.get('roles', ()))} of them.")
    if csrc is not None:
        lines.append(f"- csrc/wf_kernels.cu: {len(csrc)} kernel instantiations over "
                     f"{', '.join(f'sm_{a}' for a in sorted({r['arch'] for r in csrc}, reverse=True))}, "
                     f"{sum(1 for r in csrc if r['spill_stores'] or r['spill_loads'])} spill, registers max "
                     f"{max(r['registers'] for r in csrc)}.")
    lines += ["", f"Verdict: {'PASS: no variant spills or exceeds shared memory' if not bad else 'FAIL'}", ""]
    lines += [f"- {b}" for b in bad[:60]] + (["", f"... {len(bad) - 60} more"] if len(bad) > 60 else [])
    lines += ["", "| kernel | config | dtype | layout | variant | arch | triton | registers | spill B (st/ld) | "
                  "shared B | blocks/SM | cases |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["kernel"], -r["arch"], r.get("triton", ""), r["dtype"], r["layout"],
                                            _config_label(r))):
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {_config_label(r)} | {r['dtype']} | {r['layout']} | {_variant_label(r)} "
                         f"| sm_{r['arch']} | {r.get('triton', '')} | - | - | - | - | does not compile: {r['error']} |")
            continue
        lines.append(f"| {r['kernel']} | {_config_label(r)} | {r['dtype']} | {r['layout']} | {_variant_label(r)} | "
                     f"sm_{r['arch']} | {r.get('triton', '')} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared']:,} "
                     f"| {r['blocks_per_sm']} | {'; '.join(sorted(set(r['cases']))[:3])} |")
    if csrc:
        lines += ["", "## csrc (the CUDA extension, nvcc -Xptxas -v)", "",
                  "| kernel | arch | registers | spill B (st/ld) | shared B |", "|---|---|---|---|---|"]
        for r in csrc:
            lines.append(f"| `{r['kernel'][:110]}` | sm_{r['arch']} | {r['registers']} | "
                         f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} |")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


GPU_MACHINE_TRITON = "3.6.0"  # the GPU machine's Triton (engineering notes): what 3.8 compiles, 3.6 may not


def install_triton(version: str, target: Path) -> Path:
    """``pip install --no-deps --target`` another Triton (its own ptxas included) beside the project's, for a
    compile with the GPU machine's version. Raises RuntimeError with pip's last lines when it cannot be had."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           f"triton=={version}"], capture_output=True, text=True)
    if proc.returncode != 0 or not (target / "triton" / "__init__.py").exists():
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if not ln.startswith("WARNING: Location")]
        raise RuntimeError(f"pip could not install triton=={version}: {' | '.join(tail[-3:])}")
    return target


def run_arch_subprocess(arch: int, suite: str, json_path: Path, only: str | None = None,
                        triton_path: Path | None = None) -> subprocess.Popen:
    """Start this script for one arch in a fresh process with the environment the kernels need at import
    (``triton_path``: a folder from ``install_triton``, imported instead of the installed Triton)."""
    env = dict(os.environ, TRITON_INTERPRET="0", WFNET_TARGET_CAPABILITY=f"{arch // 10}.{arch % 10}",
               TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"wfnet-aot-sm{arch}-"),
               WFNET_AUTOTUNE=os.environ.get("WFNET_AUTOTUNE", "1"))
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--arch", str(arch), "--suite", suite,
                             "--json", str(json_path), "--in-process", *(["--only", only] if only else [])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(TARGETS))
    ap.add_argument("--suite", choices=("ci", "full"), default="full")
    ap.add_argument("--json", type=Path, help="(one arch) write the raw records here")
    ap.add_argument("--out", type=Path, help="write the table aot_<tag>.md / .json into this folder")
    ap.add_argument("--tag", default=None, help="file tag (default: <suite>_<date>)")
    ap.add_argument("--no-csrc", action="store_true", help="skip the CUDA extension's nvcc check")
    ap.add_argument("--only", help="compile only the cases whose 'name dtype layout' contains this text")
    ap.add_argument("--triton", metavar="VERSION",
                    help=f"also compile with this Triton, pip-installed into a temporary folder (e.g. "
                         f"{GPU_MACHINE_TRITON}, the GPU machine's)")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.in_process:
        (arch,) = args.arch
        records = compile_for(arch, args.suite, args.only)
        args.json.write_text(json.dumps(records))
        print(f"sm_{arch}: {len(records)} variants compiled")
        return 0
    import torch
    import triton

    t0 = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = {a: run_arch_subprocess(a, args.suite, Path(tmp) / f"{a}.json", args.only) for a in args.arch}
        if args.triton:
            other = install_triton(args.triton, Path(tmp) / "triton_other")
            procs.update({(a, args.triton): run_arch_subprocess(a, args.suite, Path(tmp) / f"{a}_other.json",
                                                                args.only, other) for a in args.arch})
        for a, p in procs.items():
            out, _ = p.communicate()
            if p.returncode != 0:
                print(out, file=sys.stderr)
                raise SystemExit(f"AOT compile for {a} failed (exit {p.returncode})")
            name = f"{a[0]}_other.json" if isinstance(a, tuple) else f"{a}.json"
            records += json.loads((Path(tmp) / name).read_text())
    csrc = None if args.no_csrc else csrc_usage(tuple(args.arch))
    elapsed = time.perf_counter() - t0
    bad = violations(records)
    print(f"{len(records)} Triton variants ({', '.join(f'sm_{a}' for a in args.arch)}) in {elapsed:.0f} s; "
          f"{len(bad)} violations")
    if args.out:
        meta = dict(date=_dt.date.today().isoformat(), machine=os.environ.get("WFNET_MACHINE", "2-core CPU, no GPU"),
                    triton=triton.__version__, torch=torch.__version__, seconds=round(elapsed, 1),
                    command="python bench/aot_verify.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        tag = args.tag or f"{args.suite}_{meta['date']}"
        print("wrote", write_table(records, csrc, args.out, tag, meta))
    for b in bad[:40]:
        print("  ", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
