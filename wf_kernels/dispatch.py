"""Per-shape choice between the two Triton designs, from measured results.

conv2d: "implicit_gemm" (Triton conv with the fused gate epilogue) or "epilogue" (cuDNN conv + one fused Triton gate
pass). linear: "gemm" (Triton GEMM with the fused epilogue) or "epilogue" (cuBLAS + one gate pass).

The table ``dispatch_table.json`` (next to this file) maps a device name and a shape key (``shape_key``) to the path
that measured faster there, with both times in ms; ``bench/bench_ops.py --record-dispatch`` writes it on the GPU
machine. Lookups are exact; a shape/device not in the table takes the default, and every decision comes with the
reason (``conv_path`` / ``linear_path`` return ``(path, reason)``; ``last_decisions`` keeps the latest per op):

* conv2d default: "epilogue". Triton convolutions measure about 0.5-1.2x cuDNN (triton-lang/triton issues 772,
  2380), so the implicit GEMM is taken only where a measurement shows it faster. groups > 1 (grouped / depthwise)
  always takes the epilogue path: the implicit-GEMM kernel is groups=1 only.
* linear default: "gemm" (a Triton GEMM can match cuBLAS at ViT qkv sizes); bf16 under the Triton interpreter takes
  "epilogue" because the interpreter's tl.dot is wrong for bf16 operands.

Overrides: ``WFNET_TRITON_CONV_PATH`` / ``WFNET_TRITON_LINEAR_PATH`` (read at import) or ``force_path(op, path)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .autotune import INTERPRET

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
CONV_PATHS = ("implicit_gemm", "epilogue")
LINEAR_PATHS = ("gemm", "epilogue")


def _load_table() -> dict:
    try:
        with open(TABLE_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _device_name() -> str:
    if INTERPRET:
        return "triton-interpreter"
    try:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


# Read once at import: dispatch runs inside torch.compile traces, where file / driver access must not happen.
TABLE = _load_table()
DEVICE_NAME = _device_name()
_forced = {"conv2d": os.environ.get("WFNET_TRITON_CONV_PATH") or None,
           "linear": os.environ.get("WFNET_TRITON_LINEAR_PATH") or None}
last_decisions: dict[str, tuple[str, str]] = {}


def force_path(op: str, path: str | None) -> None:
    """Force ``op``'s path ("implicit_gemm"/"epilogue" for conv2d, "gemm"/"epilogue" for linear); None = table."""
    valid = CONV_PATHS if op == "conv2d" else LINEAR_PATHS
    if path is not None and path not in valid:
        raise ValueError(f"unknown {op} path {path!r}; choose one of {valid}")
    _forced[op] = path


def shape_key(op: str, dtype: torch.dtype, x_shape, w_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
              groups=1, channels_last=False) -> str:
    dt = str(dtype).replace("torch.", "")
    if op == "linear":
        return f"linear|{dt}|M{x_shape[0]}|K{w_shape[1]}|N{w_shape[0]}"
    b, c, h, w = x_shape
    return (f"conv2d|{dt}|B{b}|C{c}|H{h}|W{w}|O{w_shape[0]}|k{w_shape[2]}x{w_shape[3]}|s{stride[0]}x{stride[1]}"
            f"|p{padding[0]}x{padding[1]}|d{dilation[0]}x{dilation[1]}|g{groups}|{'nhwc' if channels_last else 'nchw'}")


def _lookup(key: str):
    entry = TABLE.get(DEVICE_NAME, {}).get(key)
    return entry


def conv_path(x, weight, stride, padding, dilation, groups, channels_last) -> tuple[str, str]:
    forced = _forced["conv2d"]
    if groups != 1:
        if forced == "implicit_gemm":
            raise ValueError("WFNET_TRITON_CONV_PATH=implicit_gemm but this conv has groups > 1 (implicit GEMM "
                             "supports groups=1 only)")
        decision = ("epilogue", f"groups={groups}: the implicit-GEMM kernel supports groups=1 only")
    elif forced is not None:
        decision = (forced, "forced by force_path / WFNET_TRITON_CONV_PATH")
    else:
        key = shape_key("conv2d", x.dtype, tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups,
                        channels_last)
        entry = _lookup(key)
        if entry is not None:
            decision = (entry["path"], f"measured on {DEVICE_NAME}: implicit_gemm {entry['implicit_gemm_ms']:.4g} ms, "
                                       f"epilogue {entry['epilogue_ms']:.4g} ms")
        else:
            decision = ("epilogue", f"no measurement for this shape on {DEVICE_NAME}: default cuDNN conv + fused "
                                    f"epilogue (Triton convs measure ~0.5-1.2x cuDNN)")
    last_decisions["conv2d"] = decision
    return decision


def linear_path(x2_shape, weight, dtype) -> tuple[str, str]:
    forced = _forced["linear"]
    if INTERPRET and dtype == torch.bfloat16:
        if forced == "gemm":
            raise ValueError("the fused GEMM cannot run bf16 under the Triton interpreter (its tl.dot is wrong for "
                             "bf16 operands)")
        decision = ("epilogue", "bf16 under the Triton interpreter: tl.dot is wrong for bf16 operands there")
    elif forced is not None:
        decision = (forced, "forced by force_path / WFNET_TRITON_LINEAR_PATH")
    else:
        entry = _lookup(shape_key("linear", dtype, tuple(x2_shape), tuple(weight.shape)))
        if entry is not None:
            decision = (entry["path"], f"measured on {DEVICE_NAME}: gemm {entry['gemm_ms']:.4g} ms, "
                                       f"epilogue {entry['epilogue_ms']:.4g} ms")
        else:
            decision = ("gemm", f"no measurement for this shape on {DEVICE_NAME}: default fused Triton GEMM")
    last_decisions["linear"] = decision
    return decision
