"""Roofline cost model of the filtered conv / linear designs: PREDICTIONS from datasheet numbers, not measurements.

    time of one kernel = max(bytes moved / HBM bandwidth, FLOPs / peak dense FLOP/s of the unit it runs on)

Used by ``dispatch`` (per-shape default of a GPU with a known spec until a measurement replaces it) and by
``bench/roofline.py`` (whole-model tables). Assumptions, stated once here and quoted by both:

* Perfect on-chip reuse: a GEMM / conv reads each input and writes each output exactly once (ideal tiling), an
  elementwise pass reads and writes each element once. No launch overhead, no cache effects, no wave quantisation.
* fp32 convs run as TF32 on tensor cores when ``torch.backends.cudnn.allow_tf32`` (torch's default: True); fp32
  matmuls only when ``torch.backends.cuda.matmul.allow_tf32`` (default False: full fp32 on CUDA cores). The Triton
  kernels follow the same flags (``launch.dot_precision``).
* The roofline ranks cuDNN / cuBLAS and a Triton kernel equally at equal bytes and FLOPs, which they are not: Triton
  implicit-GEMM convolutions measure about 0.3-1.2x cuDNN's speed depending on shape (triton-lang/triton issues 772
  and 2380; docs/engineering.md section 4) and a Triton GEMM about 0.8-1.0x cuBLAS at ViT sizes. So the Triton
  designs' time is divided by an efficiency factor relative to the vendor kernel: ``IMPLICIT_GEMM_EFF`` = 0.7 (inside
  the reported range, below its midpoint 0.75: an ASSUMPTION, no GPU has timed this project's kernel yet) and
  ``TRITON_GEMM_EFF`` = 0.9 (same status). ``bench/roofline.py`` also reports the fused design at 1.0 (the ideal).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

PREDICTION_DATE = "2026-12-05"
IMPLICIT_GEMM_EFF = 0.7   # Triton implicit-GEMM conv speed / cuDNN's (assumed, see the module docstring)
TRITON_GEMM_EFF = 0.9     # Triton GEMM speed / cuBLAS's (assumed)
GATE_BYTES_PER_CHANNEL = 2 * 4  # the per-sample gates g and gb: two fp32 [B, C] tensors


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of one GPU: HBM bandwidth (bytes/s) and peak DENSE FLOP/s per operand type."""

    name: str
    bandwidth: float
    peak: dict = field(hash=False)   # "fp32" (CUDA cores), "tf32", "bf16", "fp16" (tensor cores, dense)
    match: str = ""                  # regex over torch.cuda.get_device_name()
    source: str = ""


# Vendor datasheet numbers. NVIDIA quotes tensor-core FLOP/s "with sparsity"; dense is half of that.
DEVICE_SPECS = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 3.35 TB/s HBM3; FP32 67 TFLOPS; TF32 989, BF16 1,979,
    # FP16 1,979 TFLOPS with sparsity -> 494.5 / 989.5 / 989.5 dense. torch reports an H100 SXM as
    # "NVIDIA H100 80GB HBM3" (the PCIe / NVL cards have lower clocks and bandwidth: not matched).
    "H100 SXM": DeviceSpec("H100 SXM", 3.35e12, {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12,
                                                 "fp16": 989.5e12},
                           match=r"H100(?!.*(PCIe|NVL)).*(SXM|HBM3)", source="NVIDIA H100 datasheet, SXM"),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 4.8 TB/s HBM3e; FP32 67 TFLOPS; TF32 989, BF16 / FP16
    # 1,979 TFLOPS with sparsity (the H100's compute, more and faster memory).
    "H200": DeviceSpec("H200", 4.8e12, {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12},
                       match=r"H200", source="NVIDIA H200 datasheet, SXM"),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: 2,039 GB/s HBM2e; FP32 19.5 TFLOPS; TF32 156,
    # BF16 312, FP16 312 TFLOPS dense (312 / 624 / 624 with sparsity).
    "A100 80GB": DeviceSpec("A100 80GB", 2.039e12, {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12,
                                                    "fp16": 312e12},
                            match=r"A100.*80GB", source="NVIDIA A100 datasheet, 80GB SXM"),
}


def spec_for_device(device_name: str) -> DeviceSpec | None:
    """The spec whose pattern matches a ``torch.cuda.get_device_name()`` string (e.g. "NVIDIA H100 80GB HBM3"), else
    None (an unknown GPU, the CPU, the Triton interpreter)."""
    for spec in DEVICE_SPECS.values():
        if re.search(spec.match, device_name):
            return spec
    return None


def get_spec(name: str) -> DeviceSpec:
    """A spec by its table name or a short alias (h100, h200, a100), case-insensitive."""
    alias = {"h100": "H100 SXM", "h100 sxm": "H100 SXM", "h200": "H200", "a100": "A100 80GB", "a100 80gb": "A100 80GB"}
    key = alias.get(name.lower(), name)
    if key not in DEVICE_SPECS:
        raise ValueError(f"unknown device spec {name!r}; known: {sorted(DEVICE_SPECS)} (aliases {sorted(alias)})")
    return DEVICE_SPECS[key]


def peak_key(dtype: torch.dtype, op: str, tf32: bool) -> str:
    """The unit a GEMM-like op of ``dtype`` runs on: "bf16" / "fp16" tensor cores, "tf32" for fp32 where allowed,
    else "fp32" CUDA cores. ``op`` is "conv2d" or "linear" (only for the error message)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"no roofline peak for {op} in {dtype} (fp32, bf16, fp16 only)")


def kernel_seconds(spec: DeviceSpec, nbytes: float, flops: float, unit: str = "fp32", compute_eff: float = 1.0,
                   mem_eff: float = 1.0) -> float:
    """max(bytes / bandwidth, FLOPs / peak); the efficiencies scale the attainable bandwidth / peak (1.0: ideal)."""
    t_mem = nbytes / (spec.bandwidth * mem_eff)
    t_flop = flops / (spec.peak[unit] * compute_eff) if flops else 0.0
    return max(t_mem, t_flop)


def conv_out_hw(h, w, k, stride, padding, dilation):
    return tuple((n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in zip((h, w), k, stride, padding, dilation))


def conv_path_seconds(spec: DeviceSpec, dtype: torch.dtype, x_shape, w_shape, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), groups: int = 1, tf32: bool = True, ig_eff: float = IMPLICIT_GEMM_EFF) -> dict:
    """Predicted forward seconds of the two Triton conv paths for one shape (the gated bias assumed present):

    * "epilogue": the cuDNN conv writing z, then one gate pass (read z, write out, read the [B, C] gates);
    * "implicit_gemm": one kernel reading x, W and the gates and writing out, at ``ig_eff`` of cuDNN's speed.

    Both designs pay the same following BatchNorm / activation passes (or the same folded pass), so the choice
    between them does not depend on the fold."""
    b, c_in, h, w = x_shape
    c_out, c_per_group, kh, kw = w_shape
    ho, wo = conv_out_hw(h, w, (kh, kw), stride, padding, dilation)
    es = dtype.itemsize
    x_b, w_b, z_b = b * c_in * h * w * es, c_out * c_per_group * kh * kw * es, b * c_out * ho * wo * es
    gates = b * c_out * GATE_BYTES_PER_CHANNEL
    flops = 2.0 * b * ho * wo * c_out * c_per_group * kh * kw
    unit = peak_key(dtype, "conv2d", tf32)
    conv = kernel_seconds(spec, x_b + w_b + z_b, flops, unit)
    gate_pass = kernel_seconds(spec, 2 * z_b + gates, 2.0 * b * c_out * ho * wo)
    fused = kernel_seconds(spec, x_b + w_b + z_b + gates, flops, unit) / ig_eff
    return {"implicit_gemm": fused, "epilogue": conv + gate_pass}


def linear_path_seconds(spec: DeviceSpec, dtype: torch.dtype, m: int, k: int, n: int, batch: int | None = None,
                        tf32: bool = False, gemm_eff: float = TRITON_GEMM_EFF) -> dict:
    """Predicted forward seconds of the two Triton linear paths for x [m, k] @ W[n, k]^T: "gemm" (Triton GEMM with
    the gate epilogue, at ``gemm_eff`` of cuBLAS) and "epilogue" (cuBLAS, then one gate pass). ``batch`` samples own
    the m rows (their [batch, n] gates are read once); None leaves the gate bytes out (dispatch does not know the
    batch; at ViT token counts the gates are ~200x smaller than the output)."""
    es = dtype.itemsize
    x_b, w_b, z_b = m * k * es, n * k * es, m * n * es
    gates = 0 if batch is None else batch * n * GATE_BYTES_PER_CHANNEL
    flops = 2.0 * m * n * k
    unit = peak_key(dtype, "linear", tf32)
    gemm = kernel_seconds(spec, x_b + w_b + z_b, flops, unit)
    gate_pass = kernel_seconds(spec, 2 * z_b + gates, 2.0 * m * n)
    fused = kernel_seconds(spec, x_b + w_b + z_b + gates, flops, unit) / gemm_eff
    return {"gemm": fused, "epilogue": gemm + gate_pass}
