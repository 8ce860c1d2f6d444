"""Per-shape choice between the two Triton designs, and why: measured where a GPU has timed the shape, else the
roofline prediction of the GPU's datasheet spec, else a fixed default.

conv2d: "implicit_gemm" (Triton conv with the fused gate epilogue) or "epilogue" (cuDNN conv + one fused Triton gate
pass). linear: "gemm" (Triton GEMM with the fused epilogue) or "epilogue" (cuBLAS + one gate pass).

The table ``dispatch_table.json`` (next to this file) holds two kinds of sections, each mapping a shape key
(``shape_key``) to an entry with the chosen ``path``, both paths' times and its ``source``:

* ``"<device name>"`` (as ``torch.cuda.get_device_name()`` spells it): MEASURED entries, written on the GPU machine
  by ``bench/bench_ops.py --record-dispatch`` (``source`` "measured <device> <date>", times in ``*_ms``).
* ``"roofline:<spec>"`` (``roofline.DEVICE_SPECS``: H100 SXM, H200, A100 80GB): PREDICTED entries written by
  ``bench/roofline.py --write-dispatch`` for the shapes of ResNet-18, VGG-16-BN and ViT-S (``source`` "roofline
  prediction <spec> <date>", predicted times in ``*_us``, the assumptions they were made with in ``assumes``).

Order of a decision (every decision returns ``(path, reason)``; ``last_decisions`` keeps the latest per op):

1. groups > 1 (grouped / depthwise) always takes the epilogue path: the implicit-GEMM kernel is groups=1 only;
   ``force_path`` / ``WFNET_TRITON_CONV_PATH`` / ``WFNET_TRITON_LINEAR_PATH`` (read at import) override the rest.
2. A measurement of this exact shape on this device.
3. A measurement of the same layer at the nearest batch size within 4x (label expansion doubles the batch of an
   untraining step, so exact keys often miss; the batch rarely changes which design is faster).
4. The predicted entry of the device's spec (``roofline.spec_for_device``), if it was made with the current TF32
   flag (fp32 only).
5. The same roofline computed now for a shape the table lacks (pure arithmetic on the shape: safe inside
   ``torch.compile`` traces, cached per key).
6. No spec (CPU, the Triton interpreter, an unknown GPU): conv "epilogue" (Triton convolutions measure about
   0.3-1.2x cuDNN, triton-lang/triton issues 772 and 2380, so the vendor conv is the safe default), linear "gemm";
   bf16 under the Triton interpreter takes the linear "epilogue" path because the interpreter's tl.dot is wrong for
   bf16 operands.

The roofline alone would always pick the fused designs (one pass fewer); ``roofline.IMPLICIT_GEMM_EFF`` (0.7) and
``roofline.TRITON_GEMM_EFF`` (0.9) price the Triton kernels relative to cuDNN / cuBLAS. Both are ASSUMPTIONS until
a GPU measures the shape, which is why a measured entry always wins.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from . import roofline
from .autotune import INTERPRET

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
CONV_PATHS = ("implicit_gemm", "epilogue")
LINEAR_PATHS = ("gemm", "epilogue")
PREDICTED_PREFIX = "roofline:"
NEAREST_BATCH_RATIO = 4.0


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
_nearest_memo: dict[tuple, tuple] = {}        # nearest-batch measurement per (device, key, section id, size)
_computed: dict[tuple, tuple[str, str]] = {}  # roofline decisions computed at run time (step 5): spec, key, TF32


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


_BATCH_FIELD = re.compile(r"\|(B|M)(\d+)\|")


def is_measured(entry: dict) -> bool:
    """Entries of a device section are measurements; ``source`` says so (entries written before it existed have
    none and are measurements too)."""
    return not str(entry.get("source", "measured")).startswith("roofline")


def _measured(key: str):
    """(entry, note): this device's measurement of ``key``, else of the same layer at the nearest batch (within
    ``NEAREST_BATCH_RATIO``), else (None, "")."""
    section = TABLE.get(DEVICE_NAME)
    if not section:
        return None, ""
    entry = section.get(key)
    if entry is not None and is_measured(entry):
        return entry, ""
    # the scan below runs once per key and state of the section (a forward calls this once per filtered layer)
    memo_key = (DEVICE_NAME, key, id(section), len(section))
    if memo_key not in _nearest_memo:
        _nearest_memo[memo_key] = _nearest_batch(section, key)
    return _nearest_memo[memo_key]


def _nearest_batch(section: dict, key: str):
    m = _BATCH_FIELD.search(key)
    if m is None:
        return None, ""
    want = int(m.group(2))
    best = None
    for other, e in section.items():
        om = _BATCH_FIELD.search(other)
        if om is None or not is_measured(e) or om.group(1) != m.group(1):
            continue
        if other[:om.start()] + other[om.end():] != key[:m.start()] + key[m.end():]:
            continue
        dist = abs(math.log(int(om.group(2)) / want))
        if dist <= math.log(NEAREST_BATCH_RATIO) and (best is None or dist < best[0]):
            best = (dist, e, f"{om.group(1)}={om.group(2)}")
    if best is None:
        return None, ""
    return best[1], f" at {best[2]} (nearest measured batch to {m.group(1)}={want})"


def _predicted(key: str, spec, dtype, tf32: bool):
    entry = TABLE.get(PREDICTED_PREFIX + spec.name, {}).get(key)
    if entry is None:
        return None
    if dtype == torch.float32 and entry.get("assumes", {}).get("tf32") != tf32:
        return None  # made for the other TF32 setting: recompute for this one
    return entry


def _times(entry: dict, paths, unit: str) -> str:
    # plain str(round()) concatenation: torch.compile traces this, and dynamo mis-handles nested format specs
    return ", ".join(p + " " + str(round(float(entry[p + "_" + unit]), 4)) + " " + unit for p in paths)


def _ints(sizes) -> tuple:
    """Concrete sizes. Under torch.compile a dynamic size is a SymInt that int() keeps symbolic (the roofline
    arithmetic on it then cannot be compared or formatted); formatting it specialises it to its value, as building
    the shape key always did, so a decision is made per concrete shape."""
    return tuple(int(f"{v}") for v in sizes)


def _assumes(entry: dict) -> str:
    return ", ".join(k + "=" + str(v) for k, v in sorted(entry.get("assumes", {}).items()))


def conv_prediction(spec, dtype, x_shape, w_shape, stride, padding, dilation, groups, channels_last,
                    tf32: bool, ig_eff: float = roofline.IMPLICIT_GEMM_EFF) -> tuple[str, dict]:
    """(key, entry) of the roofline prediction for one conv shape on ``spec``: what ``bench/roofline.py`` writes
    to the table and what step 5 computes for shapes the table lacks."""
    t = roofline.conv_path_seconds(spec, dtype, x_shape, w_shape, stride, padding, dilation, groups, tf32, ig_eff)
    key = shape_key("conv2d", dtype, x_shape, w_shape, stride, padding, dilation, groups, channels_last)
    # (no min(key=...): dynamo cannot trace it; a tie keeps the vendor kernel)
    entry = {"path": "implicit_gemm" if t["implicit_gemm"] < t["epilogue"] else "epilogue",
             **{f"{p}_us": round(t[p] * 1e6, 3) for p in CONV_PATHS},
             "source": f"roofline prediction {spec.name} {roofline.PREDICTION_DATE}",
             "assumes": {"implicit_gemm_eff": ig_eff, "tf32": bool(tf32) if dtype == torch.float32 else None}}
    return key, entry


def linear_prediction(spec, dtype, m: int, k: int, n: int, tf32: bool,
                      gemm_eff: float = roofline.TRITON_GEMM_EFF) -> tuple[str, dict]:
    """(key, entry) of the roofline prediction for x [m, k] @ W[n, k]^T on ``spec`` (see :func:`conv_prediction`;
    the batch is not part of the key, so the small [B, n] gate reads are left out)."""
    t = roofline.linear_path_seconds(spec, dtype, m, k, n, None, tf32, gemm_eff)
    key = shape_key("linear", dtype, (m, k), (n, k))
    entry = {"path": "gemm" if t["gemm"] < t["epilogue"] else "epilogue",
             **{f"{p}_us": round(t[p] * 1e6, 3) for p in LINEAR_PATHS},
             "source": f"roofline prediction {spec.name} {roofline.PREDICTION_DATE}",
             "assumes": {"gemm_eff": gemm_eff, "tf32": bool(tf32) if dtype == torch.float32 else None}}
    return key, entry


def _decide(op: str, key: str, paths, dtype, tf32: bool, predict, default: tuple[str, str]) -> tuple[str, str]:
    """Steps 2-6 of the module docstring for a key."""
    entry, note = _measured(key)
    if entry is not None:
        return entry["path"], f"measured on {DEVICE_NAME}{note}: {_times(entry, paths, 'ms')}"
    spec = roofline.spec_for_device(DEVICE_NAME)
    if spec is None:
        return default
    entry = _predicted(key, spec, dtype, tf32)
    if entry is not None:
        return entry["path"], (f"{entry['source']} (table; no measurement on {DEVICE_NAME} yet): "
                               f"{_times(entry, paths, 'us')} predicted, assuming {_assumes(entry)}")
    cache_key = (spec.name, key, tf32)
    if cache_key not in _computed:
        _, e = predict(spec)
        _computed[cache_key] = (e["path"], f"roofline prediction {spec.name} computed for this shape (not in the "
                                           f"table; no measurement on {DEVICE_NAME}): {_times(e, paths, 'us')} "
                                           f"predicted, assuming {_assumes(e)}")
    return _computed[cache_key]


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
        xs, ws = _ints(x.shape), _ints(weight.shape)
        key = shape_key("conv2d", x.dtype, xs, ws, stride, padding, dilation, groups, channels_last)
        tf32 = bool(torch.backends.cudnn.allow_tf32)
        decision = _decide(
            "conv2d", key, CONV_PATHS, x.dtype, tf32,
            lambda spec: conv_prediction(spec, x.dtype, xs, ws, stride, padding, dilation, groups, channels_last,
                                         tf32),
            ("epilogue", f"no measurement for this shape on {DEVICE_NAME} and no datasheet spec to predict from: "
                         f"default cuDNN conv + fused epilogue (Triton convs measure ~0.3-1.2x cuDNN)"))
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
        m, k, n = _ints((x2_shape[0], x2_shape[1], weight.shape[0]))
        key = shape_key("linear", dtype, (m, k), (n, k))
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        decision = _decide(
            "linear", key, LINEAR_PATHS, dtype, tf32,
            lambda spec: linear_prediction(spec, dtype, m, k, n, tf32),
            ("gemm", f"no measurement for this shape on {DEVICE_NAME} and no datasheet spec to predict from: "
                     f"default fused Triton GEMM"))
    last_decisions["linear"] = decision
    return decision
