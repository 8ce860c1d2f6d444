"""What every kernel launch needs besides its arguments: the right device, and the matmul precision torch promises.

* ``device_guard(t)``: Triton launches on the *current* CUDA device; tensors on ``cuda:1`` need
  ``torch.cuda.device(t.device)`` around the launch (a no-op context for CPU tensors under the interpreter).
* ``dot_precision(op, dtype)``: ``tl.dot`` on fp32 operands defaults to TF32 on NVIDIA GPUs, while torch promises
  full fp32 for matmuls unless ``torch.backends.cuda.matmul.allow_tf32`` (i.e. ``set_float32_matmul_precision``
  "high"/"medium") and TF32 for convolutions unless ``torch.backends.cudnn.allow_tf32`` is False. The kernels take
  the precision as a constexpr, chosen here from the same flags (as inductor's matmul templates do). 16-bit operands
  ignore it.
"""
from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tf32_enabled(op: str) -> bool:
    """Whether torch allows TF32 for ``op`` ("linear": cuBLAS matmul flag, "conv2d": cuDNN flag)."""
    if op == "linear":
        return bool(torch.backends.cuda.matmul.allow_tf32)
    if op == "conv2d":
        return bool(torch.backends.cudnn.allow_tf32)
    raise ValueError(f"unknown op {op!r}")


def dot_precision(op: str, dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: "tf32" where torch allows TF32 for fp32 ``op``, else "ieee"."""
    return "tf32" if dtype == torch.float32 and tf32_enabled(op) else "ieee"
