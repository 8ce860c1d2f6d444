"""wfnet: multi-class machine unlearning by weight filtering (WF-Net), with fused GPU kernels.

    wf = wfnet.wrap(model, num_classes=10)   # filtered layers with per-class gates, original weights frozen
    wf(x, forget=rows)                       # each sample forgets its own class row; forget=None = original model
"""
__version__ = "0.1.0"

from . import adapters, ops
from .backends import BackendUnavailableError, available_backends, get_backend, set_backend, use_backend
from .layers import WFConv2d, WFLinear, WFMultiheadAttention
from .model import (CoverageError, Target, TargetPlan, UnsupportedModelError, WFModel, export, find_targets, forgetting,
                    wrap)
from .serialization import load_filters, read_filters_metadata, save_filters
from .run import Run, RunError

__all__ = [
    "__version__", "ops", "wrap", "WFModel", "forgetting", "export", "find_targets", "save_filters", "load_filters",
    "read_filters_metadata", "WFConv2d", "WFLinear", "set_backend", "get_backend", "use_backend",
    "available_backends", "BackendUnavailableError", "Run", "RunError", "adapters", "WFMultiheadAttention",
    "TargetPlan", "Target", "CoverageError", "UnsupportedModelError",
]
