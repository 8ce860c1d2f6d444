"""Backend registry and dispatch for the weight-filtering ops.

Every backend computes the same function (see ``wfnet.ops``); they differ in how. A backend is an object with

* ``name``
* ``unsupported(op, x, weight, ...) -> list[str]``: the reasons it cannot take this input (empty list = it can);
* ``conv2d(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups)``;
* ``linear(x, weight, bias, alpha_weight, alpha_bias, rows)``;
* ``conv2d_gates(x, weight, g, gb, stride, padding, dilation, groups)`` / ``linear_gates(x, weight, g, gb)``: the same
  with per-sample gates given directly (fp32 [B, C]: weight gate and gated bias), what forget SETS use (the gates are
  composed in ``wfnet.ops`` by ``wfnet.sets``). A backend that cannot take them says so in ``unsupported`` when
  ``rows.mask`` is set (the cuda backend does), so "auto" falls back and an explicit request raises.
* the fold (:mod:`wfnet.fold`: an eval-mode BatchNorm + activation after the layer): ``sample_gates(alpha_weight,
  alpha_bias, bias, rows)`` gives the rows' gates (fp32 [B, C]) that ``wfnet.ops`` folds (``s * g``, ``s * gb + t``)
  and hands to ``conv2d_gates`` / ``linear_gates`` with ``act=`` (the activation, applied in the same pass); a
  backend whose kernel gathers the rows' gates itself sets ``folds_rows = True`` and takes ``fold=`` (a
  ``wfnet.fold.Affine``) in ``conv2d`` / ``linear`` instead (cuda). ``unsupported`` also receives ``fold``.

The ops hand backends *normalised* arguments: rows as a validated :class:`wfnet.rows.LayerRows` (``.index``: int64
[B] on x's device, in range; ``.segments()``: the per-batch sort by row, shared by every layer of a forward), padding
as a pair of ints (string / asymmetric padding is resolved beforehand), stride and dilation as pairs.

Selection (xformers-style): an explicitly requested backend that cannot take the input raises
:class:`BackendUnavailableError` listing every reason; ``"auto"`` walks the preference list for the device and takes
the first backend with no reasons.

"auto" never sends a user to unverified kernels: on a CUDA device it tries ``triton`` / ``cuda`` only where the GPU
check (``bench/gpu_check.sh``) recorded a passing verification for that device name (``wf_kernels/verification.json``),
and otherwise takes ``torch`` (cuDNN / cuBLAS + the torch epilogue). ``auto_choice(device)`` says which order applies
and why. An explicit ``backend="triton"`` or ``"cuda"`` is always honoured. Backends whose module fails to import (no Triton, no compiled extension) report
that as their reason, so an explicit request explains how to fix it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
    "BACKEND_NAMES",
    "auto_choice",
]

# name -> module that defines a module-level ``BACKEND`` object. Imported lazily: Triton and the CUDA extension are
# optional, and importing Triton kernels must happen after TRITON_INTERPRET is set.
_BACKEND_MODULES = {
    "naive": "wfnet.backends.naive",
    "torch": "wfnet.backends.torch_ref",
    "triton": "wfnet.backends.triton",
    "cuda": "wfnet.backends.cuda",
}
BACKEND_NAMES = ("auto",) + tuple(_BACKEND_MODULES)

# "auto" preference on CUDA among the VERIFIED fused backends; torch always closes the list. The naive path is a
# reference, never picked automatically.
_FUSED_PREFERENCE = ("triton", "cuda")
_auto_cache: dict = {}  # device -> (order, reason); filled outside compiled regions (driver + file access)

_loaded: dict[str, object] = {}
_import_errors: dict[str, str] = {}
_state = threading.local()
_global_default: str | None = None


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run the given input."""


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_BACKEND_MODULES[name])
        _loaded[name] = mod.BACKEND
        return mod.BACKEND
    except Exception as exc:  # optional dependency missing / extension not built
        hint = getattr(exc, "wfnet_hint", None)
        _import_errors[name] = f"backend '{name}' failed to import: {exc!r}" + (f" ({hint})" if hint else "")
        return None


def _preload(name: str | None) -> None:
    """Import a backend when it is selected, not on first use: first use may be inside a torch.compile trace,
    where dynamo cannot follow ``importlib.import_module`` (a graph break, an error under fullgraph=True)."""
    if name is not None and name != "auto":
        _load(name)


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend ("auto", "naive", "torch", "triton", "cuda"); None restores the default
    (the ``WFNET_BACKEND`` environment variable, else "auto")."""
    global _global_default
    _global_default = None if name is None else _check_name(name)
    _preload(_global_default)


def get_backend() -> str:
    """The backend name the ops use when called with ``backend=None``."""
    override = getattr(_state, "stack", None)
    if override:
        return override[-1]
    if _global_default is not None:
        return _global_default
    return _check_name(os.environ.get("WFNET_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` for the ops called inside (this thread only)."""
    _preload(_check_name(name))
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def available_backends() -> dict[str, str | None]:
    """Map every backend name to None if it imports, else the import error. Whether each can also RUN on a device
    here, and whether "auto" picks it, is :func:`backend_status`."""
    return {name: (None if _load(name) is not None else _import_errors.get(name)) for name in _BACKEND_MODULES}


def backend_status(device="cpu") -> dict[str, dict]:
    """For every backend: whether it imports, whether it can run a filtered conv and linear on ``device`` here, and
    why not; plus whether "auto" would choose it there (and why). ``available_backends()`` only says what imports."""
    import torch

    from ..rows import Rows

    device = torch.device(device)
    order, auto_reason = auto_choice(device)
    x = torch.zeros(1, 2, 3, 3, device=device)
    conv = dict(x=x, weight=torch.zeros(2, 2, 1, 1, device=device), bias=torch.zeros(2, device=device),
                alpha_weight=torch.zeros(2, 2, device=device), alpha_bias=torch.zeros(2, 2, device=device),
                rows=Rows.prepare(0, 2).bind(x), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    xl = torch.zeros(1, 3, 2, device=device)
    lin = dict(x=xl, weight=torch.zeros(2, 2, device=device), bias=None, alpha_weight=conv["alpha_weight"],
               alpha_bias=None, rows=Rows.prepare(0, 2).bind(xl))
    status = {}
    for name in _BACKEND_MODULES:
        imported = _load(name) is not None
        reasons = [] if imported else [_import_errors[name]]
        if imported:
            reasons = list(dict.fromkeys(_reasons(name, "conv2d", conv) + _reasons(name, "linear", lin)))
        status[name] = {"imports": imported, "runs_here": not reasons, "why_not": "; ".join(reasons) or None,
                        "auto_picks": name == order[0],
                        "auto": f"tried {order.index(name) + 1} of {len(order)}" if name in order
                        else ("never (reference)" if name == "naive" else "not tried: " + auto_reason)}
    return status


def _verification_table() -> dict:
    try:
        from wf_kernels.verification import load_verification
    except ImportError:  # wf_kernels not importable: nothing is verified
        return {}
    return load_verification()


def auto_choice(device) -> tuple[tuple[str, ...], str]:
    """``(order, reason)``: the backends "auto" tries, in order, for tensors on ``device``, and why."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cached = _auto_cache.get(device)
    if cached is not None:
        return cached
    if device.type != "cuda":
        choice = ("torch",), f"{device.type} tensors: the torch backend (the reference; the fused kernels need CUDA)"
    else:
        choice = cuda_auto_order(torch.cuda.get_device_name(device), _verification_table())
    _auto_cache[device] = choice
    return choice


def _auto_order(device: str) -> tuple[str, ...]:
    order = auto_choice(device)[0]
    for name in order:  # imported here, never inside a compiled region (dynamo cannot follow importlib)
        _load(name)
    return order


# torch.compile evaluates _auto_order once at trace time (driver and file access) and keeps the result as a constant:
# what torch._dynamo.assume_constant_result(fn) does, without importing dynamo (1 s) on every `import wfnet`.
_auto_order._dynamo_marked_constant = True


def cuda_auto_order(device_name: str, table: dict) -> tuple[tuple[str, ...], str]:
    """"auto"'s order on the CUDA device called ``device_name``, given the verification record ``table``: the
    verified fused backends in preference order, then torch; with the reason for each."""
    try:
        from wf_kernels.verification import verification_status
    except ImportError as exc:  # no wf_kernels: nothing can have been verified
        return ("torch",), f"{device_name}: torch, since the verification record cannot be read ({exc})"
    verified, notes = [], []
    for backend in _FUSED_PREFERENCE:
        ok, why = verification_status(device_name, backend, table)
        if ok:
            verified.append(backend)
        notes.append(f"{backend}: {why}")
    order = tuple(verified) + ("torch",)
    head = (f"{order[0]} first" if verified else
            "torch (cuDNN / cuBLAS + the torch epilogue), since no fused backend is verified on this device")
    return order, f"{device_name}: {head} [{'; '.join(notes)}]"


def _reasons(name: str, op: str, args: dict) -> list[str]:
    backend = _load(name)
    if backend is None:
        return [_import_errors[name]]
    return list(backend.unsupported(op, **args))


def resolve_backend(op: str, requested: str | None, args: dict):
    """Return the backend object that runs ``op`` on ``args`` (the normalised op arguments)."""
    name = _check_name(requested) if requested is not None else get_backend()
    if name != "auto":
        reasons = _reasons(name, op, args)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run wf_{op} on this input:\n  - " + "\n  - ".join(reasons)
            )
        return _loaded[name]
    order = _auto_order(str(args["x"].device))
    all_reasons = {}
    for candidate in order:
        reasons = _reasons(candidate, op, args)
        if not reasons:
            return _loaded[candidate]
        all_reasons[candidate] = reasons
    lines = [f"{n}: {'; '.join(r)}" for n, r in all_reasons.items()]
    raise BackendUnavailableError(f"no backend can run wf_{op} on this input:\n  - " + "\n  - ".join(lines))
