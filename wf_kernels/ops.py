"""The package's entry points: the functional API of the fused ops and the custom ops behind them, in one place.

    wf_kernels::gate_rows    (A [N_c,C], rows [B], perm, starts) -> sigmoid(A)[rows] fp32 [B, C]         gates.py
    wf_kernels::class_grad   (grad_g [B,C], A, perm, starts) -> grad_A [N_c, C]                           gates.py
    wf_kernels::linear_fwd   (x [B,T,K], W, g [B,N], gb?, path, save_z, precision, act) -> (out, z or empty)  linear.py
    wf_kernels::conv2d_fwd   (x, W, g, gb?, stride, padding, dilation, groups, path, save_z, precision, act)  conv2d.py
    wf_kernels::gate_bwd     (grad_out, z, g, channel_dim, need_gz, need_g, need_gb, gb?, act)            backward.py

Each op lives in its own file, in the order reference -> kernel -> launcher -> custom op + fake -> autograd ->
functional entry (``linear.wf_linear``, ``conv2d.wf_conv2d``), with its tests mirrored in ``tests/test_triton_*.py``;
this module imports them (which registers the ops) and re-exports what the "triton" backend calls.

``act`` (default "none"): an elementwise activation folded into the epilogue with a following BatchNorm (wfnet.fold:
the gates g / gb then already carry the BatchNorm's affine). Its backward needs the pre-activation, recomputed from z
and the gates, so with an activation z is saved whenever any input needs a gradient.

The functional API first computes the per-sample gates once per layer call (``gates.sample_gates``: g =
sigmoid(A_w)[rows], gb = sigmoid(A_b)[rows] * b, fp32 [B, C]), then runs the fused forward. Autograd chains the
fused backward (grad_z, and grad_g / grad_gb per sample, no atomics) into the deterministic class reduction of
``gate_rows`` over the batch's sorted segments, and into grad_bias for a trainable bias. So the whole backward is
bitwise reproducible, whatever ``torch.use_deterministic_algorithms`` says.

Custom ops (not ``triton_op``, which fails under fake tensors on a CPU-only machine) make the kernels opaque to
torch.compile: a compiled model keeps the fused kernels and has no graph break in the filtered layers.

The forward saves z (the bias-free conv / matmul output, as autograd would) only when the weight gates need a
gradient (``backward.save_z_for_backward``; an op called with save_z=False whose g needs a gradient recomputes z in
the backward); otherwise the epilogue path writes the gate in place over the fresh conv / matmul output. The backward
runs the fused gate pass (``backward.fused_gate_grads``), then grad_x = grad_z @ W (cuBLAS) or the conv input
gradient (cuDNN); a trainable weight gets grad_z^T x / the conv weight gradient.
"""
from __future__ import annotations

from .backward import gate_bwd  # noqa: F401  (registers wf_kernels::gate_bwd)
from .conv2d import conv2d_fwd, wf_conv2d  # noqa: F401
from .epilogue import is_channels_last  # noqa: F401
from .gates import class_grad, gate_rows, sample_gates, segments  # noqa: F401
from .linear import linear_fwd, wf_linear  # noqa: F401

__all__ = ["wf_linear", "wf_conv2d", "sample_gates", "segments", "is_channels_last"]
