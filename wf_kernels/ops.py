"""torch.library custom ops wrapping the kernels, with fake (meta) kernels and autograd, plus the functional API.

    wf_kernels::gate_rows    (A [N_c,C], rows [B], perm, starts) -> sigmoid(A)[rows] fp32 [B, C]     (see gates.py)
    wf_kernels::linear_fwd   (x [B,T,K], W, g [B,N], gb?, path, save_z, precision, act) -> (out [B,T,N], z or empty)
    wf_kernels::conv2d_fwd   (x, W, g, gb?, stride, padding, dilation, groups, path, save_z, precision, act) -> (out, z)
    wf_kernels::gate_bwd     (grad_out, z, g, channel_dim, need_gz, need_g, need_gb, gb?, act) -> (gz, grad_g, grad_gb)

``act`` (default "none"): an elementwise activation folded into the epilogue with a following BatchNorm (wfnet.fold:
the gates g / gb then already carry the BatchNorm's affine). Its backward needs the pre-activation, recomputed from z
and the gates, so with an activation z is saved whenever any input needs a gradient.

The functional API (``wf_linear`` / ``wf_conv2d``) first computes the per-sample gates once per layer call
(``gates.sample_gates``: g = sigmoid(A_w)[rows], gb = sigmoid(A_b)[rows] * b, fp32 [B, C]), then runs the fused
forward. Autograd chains the fused backward (grad_z, and grad_g / grad_gb per sample, no atomics) into the
deterministic class reduction of ``gate_rows`` over the batch's sorted segments, and into grad_bias for a trainable
bias. So the whole backward is bitwise reproducible, whatever ``torch.use_deterministic_algorithms`` says.

Custom ops (not ``triton_op``, which fails under fake tensors on a CPU-only machine) make the kernels opaque to
torch.compile: a compiled model keeps the fused kernels and has no graph break in the filtered layers.

The forward saves z (the bias-free conv / matmul output, as autograd would) only when the weight gates need a
gradient (an op called with save_z=False whose g needs a gradient recomputes z in the backward); otherwise the
epilogue path writes the gate in place over the fresh conv / matmul output. The backward runs the fused gate pass
(``backward.gate_backward``), then grad_x = grad_z @ W (cuBLAS) or the conv input gradient (cuDNN); a trainable
weight gets grad_z^T x / the conv weight gradient.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .backward import gate_backward
from .conv2d import conv2d_forward, is_channels_last, out_shape
from .gates import gate_rows, sample_gates, segments  # noqa: F401  (gate_rows: registers the op)
from .launch import dot_precision
from .linear import linear_forward


# ----------------------------------------------------------------------------------------------------- linear op
@torch.library.custom_op("wf_kernels::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, g: Tensor, gb: Optional[Tensor], path: str, save_z: bool,
               precision: str, act: str = "none") -> Tuple[Tensor, Tensor]:
    return linear_forward(x, weight, g, gb, path, save_z, precision, act)


@linear_fwd.register_fake
def _(x, weight, g, gb, path, save_z, precision, act="none"):
    out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
    return out, (torch.empty_like(out) if save_z else x.new_empty(0))


# ----------------------------------------------------------------------------------------------------- conv op
@torch.library.custom_op("wf_kernels::conv2d_fwd", mutates_args=())
def conv2d_fwd(x: Tensor, weight: Tensor, g: Tensor, gb: Optional[Tensor], stride: List[int], padding: List[int],
               dilation: List[int], groups: int, path: str, save_z: bool, precision: str,
               act: str = "none") -> Tuple[Tensor, Tensor]:
    return conv2d_forward(x, weight, g, gb, tuple(stride), tuple(padding), tuple(dilation), groups, path, save_z,
                          precision, act)


@conv2d_fwd.register_fake
def _(x, weight, g, gb, stride, padding, dilation, groups, path, save_z, precision, act="none"):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    shp = out_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shp, dtype=x.dtype, device=x.device, memory_format=fmt)
    return out, (torch.empty_like(out) if save_z else x.new_empty(0))


# ----------------------------------------------------------------------------------------------------- backward op
@torch.library.custom_op("wf_kernels::gate_bwd", mutates_args=())
def gate_bwd(grad_out: Tensor, z: Tensor, g: Tensor, channel_dim: int, need_gz: bool, need_g: bool,
             need_gb: bool, gb: Optional[Tensor] = None, act: str = "none") -> Tuple[Tensor, Tensor, Tensor]:
    return gate_backward(grad_out, z, g, channel_dim, need_gz, need_g, need_gb, gb, act)


@gate_bwd.register_fake
def _(grad_out, z, g, channel_dim, need_gz, need_g, need_gb, gb=None, act="none"):
    ref = z if z.numel() else grad_out
    if ref.dim() == 4 and is_channels_last(ref):
        gz = torch.empty(ref.shape, dtype=ref.dtype, device=ref.device, memory_format=torch.channels_last)
    else:
        gz = ref.new_empty(ref.shape)
    f32 = dict(dtype=torch.float32, device=g.device)
    return (gz if need_gz else grad_out.new_empty(0), torch.empty(g.shape, **f32) if need_g else torch.empty(0, **f32),
            torch.empty(g.shape, **f32) if need_gb else torch.empty(0, **f32))


def _grads_common(ctx, grad_out, channel_dim, recompute_z):
    x, weight, g, gb, z = ctx.saved_tensors
    need_x, need_w, need_g, need_gb = ctx.needs_input_grad[:4]
    act = ctx.act
    if (need_g or act != "none") and z.numel() == 0:  # not saved in forward although needed: recompute z
        z = recompute_z(x, weight)
    gz, grad_g, grad_gb = torch.ops.wf_kernels.gate_bwd(grad_out, z, g, channel_dim, need_x or need_w, need_g,
                                                        need_gb, gb if act != "none" else None, act)
    return x, weight, gz, (grad_g if need_g else None), (grad_gb if need_gb else None)


def _linear_setup(ctx, inputs, output):
    x, weight, g, gb, path, save_z, precision, *act = inputs
    ctx.act = act[0] if act else "none"
    ctx.save_for_backward(x, weight, g, gb if ctx.act != "none" else None, output[1])


def _linear_backward(ctx, grad_out, _grad_z_unused):
    x, weight, gz, grad_g, grad_gb = _grads_common(ctx, grad_out, -1, lambda x, w: torch.matmul(x, w.t()))
    need = ctx.needs_input_grad
    grad_x = torch.matmul(gz, weight) if need[0] else None
    grad_w = torch.matmul(gz.reshape(-1, gz.shape[-1]).t(), x.reshape(-1, x.shape[-1])) if need[1] else None
    return grad_x, grad_w, grad_g, grad_gb, None, None, None, None


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def _conv_setup(ctx, inputs, output):
    x, weight, g, gb, stride, padding, dilation, groups, path, save_z, precision, *act = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.act = act[0] if act else "none"
    ctx.save_for_backward(x, weight, g, gb if ctx.act != "none" else None, output[1])


def _conv_backward(ctx, grad_out, _grad_z_unused):
    stride, padding, dilation, groups = ctx.conv
    x, weight, gz, grad_g, grad_gb = _grads_common(
        ctx, grad_out, 1, lambda x, w: torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups))
    need = ctx.needs_input_grad
    grad_x = grad_w = None
    if need[0] or need[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            gz, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    return grad_x, grad_w, grad_g, grad_gb, None, None, None, None, None, None, None, None


conv2d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------------------------------- functional API
def _segments_fn(rows, num_classes, segs):
    """A zero-argument callable giving (perm, starts): ``segs`` itself when callable (shared per batch, e.g.
    ``wfnet.rows.LayerRows.segments``), the given pair, or built from ``rows`` for this call alone."""
    if callable(segs):
        return segs
    if segs is not None:
        return lambda: segs
    return lambda: segments(rows, num_classes)


def _save_z(g, act="none", *others) -> bool:
    """z is saved for the weight gates' gradient; with a folded activation for any gradient (the backward recomputes
    the pre-activation from it)."""
    if not torch.is_grad_enabled():
        return False
    if act != "none":
        return any(t is not None and t.requires_grad for t in (g,) + others)
    return g.requires_grad


def wf_linear(x, weight, bias, alpha_weight, alpha_bias, rows, segments=None, path: str | None = None,
              gates=None, act: str = "none"):
    """Fused filtered linear on [B, ..., K]. ``rows``: validated int64 [B]; ``segments``: (perm, starts) of the rows
    or a callable returning them (built here when None; only used when a gate logit needs a gradient); ``path``
    None = ``dispatch.linear_path``. ``gates``: per-sample gates ``(g, gb)`` given directly (fp32 [B, C], e.g.
    composed for forget sets by ``wfnet.sets``, or folded with a BatchNorm by ``wfnet.fold``; their gradient flows
    back through autograd) in place of the rows; ``act``: an activation folded into the epilogue (wfnet.fold)."""
    b, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, k)
    if not x3.is_contiguous():
        x3 = x3.contiguous()
    if path is None:
        path = dispatch.linear_path((x3.shape[0] * x3.shape[1], k), weight, x.dtype)[0]
    g, gb = gates if gates is not None else sample_gates(alpha_weight, alpha_bias, bias, rows,
                                                         _segments_fn(rows, alpha_weight.shape[0], segments))
    out, _ = torch.ops.wf_kernels.linear_fwd(x3, weight, g, gb, path, _save_z(g, act, gb, x3, weight),
                                             dot_precision("linear", x.dtype), act)
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


def wf_conv2d(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups, segments=None,
              path: str | None = None, gates=None, act: str = "none"):
    """Fused filtered conv2d (normalised args as the backends get them; ``segments``, ``gates`` and ``act`` as in
    :func:`wf_linear`); ``path`` None = ``dispatch.conv_path``."""
    cl = is_channels_last(x)
    if not (cl or x.is_contiguous()):
        x = x.contiguous()
    if path is None:
        path = dispatch.conv_path(x, weight, stride, padding, dilation, groups, cl)[0]
    g, gb = gates if gates is not None else sample_gates(alpha_weight, alpha_bias, bias, rows,
                                                         _segments_fn(rows, alpha_weight.shape[0], segments))
    out, _ = torch.ops.wf_kernels.conv2d_fwd(x, weight, g, gb, list(stride), list(padding), list(dilation),
                                             int(groups), path, _save_z(g, act, gb, x, weight),
                                             dot_precision("conv2d", x.dtype), act)
    return out
