"""wfnet: multi-class machine unlearning by weight filtering (WF-Net), with fused GPU kernels.

    wf = wfnet.wrap(model, num_classes=10)   # filtered layers with per-class gates, original weights frozen
    wf(x, forget=rows)                       # each sample forgets its own class row; forget=None = original model

The names below are imported on first use (PEP 562), so that ``import wfnet`` (and ``wfnet --help``) does not pay for
torch until something needs it.
"""
from __future__ import annotations

import importlib

from ._version import __version__

# public name -> the submodule that defines it (None: the name IS a submodule)
_EXPORTS = {
    "ops": None, "adapters": None, "audit": None, "rows": None, "model": None, "layers": None, "backends": None,
    "metrics": None, "untrain": None, "data": None, "models": None, "config": None, "evaluate": None,
    "explain": None, "run": None, "sets": None,
    "wrap": "model", "WFModel": "model", "forgetting": "model", "export": "model", "find_targets": "model",
    "TargetPlan": "model", "Target": "model", "CoverageError": "model", "UnsupportedModelError": "model",
    "WFConv2d": "layers", "WFLinear": "layers", "WFMultiheadAttention": "layers",
    "save_filters": "serialization", "load_filters": "serialization", "read_filters_metadata": "serialization",
    "set_backend": "backends", "get_backend": "backends", "use_backend": "backends",
    "available_backends": "backends", "BackendUnavailableError": "backends",
    "Run": "run", "RunError": "run", "CorruptFileError": "files",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wfnet' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
