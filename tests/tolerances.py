"""Per-precision tolerances for the kernel tests (relative to the reference's max magnitude).

fp32 is exact on the Triton interpreter and on a GPU where torch disallows TF32 for the op (the kernels then use
``input_precision="ieee"``); where TF32 is allowed (cuBLAS flag for linear, cuDNN flag for conv; the cuDNN one is on by
default) both the kernel and the cuDNN / cuBLAS reference round their inputs to a 10-bit mantissa, so the comparison
needs a TF32 tolerance. 16-bit dtypes get their own.
"""
from __future__ import annotations

import contextlib

import torch

EXACT_FP32 = 2e-4
TF32 = 5e-3
HALF = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
HALF_GPU = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


def tf32_in_effect(op: str, device) -> bool:
    """Whether fp32 ``op`` ("linear" / "conv2d") runs with TF32 on ``device`` under torch's current flags."""
    from wf_kernels.launch import tf32_enabled

    return torch.device(device).type == "cuda" and tf32_enabled(op)


def tolerance(dtype: torch.dtype, op: str, device) -> float:
    if dtype == torch.float32:
        return TF32 if tf32_in_effect(op, device) else EXACT_FP32
    return (HALF_GPU if torch.device(device).type == "cuda" else HALF)[dtype]


@contextlib.contextmanager
def tf32(enabled: bool):
    """Set both TF32 flags (cuBLAS matmul and cuDNN) inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
