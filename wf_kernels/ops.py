"""torch.library custom ops wrapping the kernels, with fake (meta) kernels and autograd, plus the functional API.

    wf_kernels::linear_fwd   (x [B,T,K], W, b?, A_w, A_b?, rows, path, save_z) -> (out [B,T,N], z or empty)
    wf_kernels::conv2d_fwd   (x, W, b?, A_w, A_b?, rows, stride, padding, dilation, groups, path, save_z) -> (out, z)
    wf_kernels::gate_bwd     (grad_out, z, b?, A_w, A_b?, rows, channel_dim, deterministic, need_*) -> (gz, gA_w, gA_b)

Custom ops (not ``triton_op``, which fails under fake tensors on a CPU-only machine) make the kernels opaque to
torch.compile: a compiled model keeps the fused kernels and has no graph break in the filtered layers.

The forward saves z (the bias-free conv / matmul output, as autograd would) only when A_w needs a gradient (an op
called with save_z=False whose A_w needs a gradient recomputes z in the backward). The
backward runs the fused gate pass (``backward.gate_backward``), then grad_x = grad_z @ W (cuBLAS) or the conv input
gradient (cuDNN); a trainable weight gets grad_z^T x / the conv weight gradient, a trainable bias sum(grad_out * gate_b).
The reduction into class rows is deterministic when ``torch.are_deterministic_algorithms_enabled()`` or
``set_deterministic(True)``, atomic otherwise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .backward import gate_backward
from .conv2d import conv2d_forward, is_channels_last, out_shape
from .linear import linear_forward

_DETERMINISTIC = [False]


def set_deterministic(flag: bool) -> None:
    """Force the deterministic (sorted-segment) reduction of the gate gradients regardless of torch's setting."""
    _DETERMINISTIC[0] = bool(flag)


def deterministic() -> bool:
    return _DETERMINISTIC[0] or torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------------------- linear op
@torch.library.custom_op("wf_kernels::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha_weight: Tensor, alpha_bias: Optional[Tensor],
               rows: Tensor, path: str, save_z: bool) -> Tuple[Tensor, Tensor]:
    return linear_forward(x, weight, bias, alpha_weight, alpha_bias, rows, path, save_z)


@linear_fwd.register_fake
def _(x, weight, bias, alpha_weight, alpha_bias, rows, path, save_z):
    out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
    return out, (torch.empty_like(out) if save_z else x.new_empty(0))


# ----------------------------------------------------------------------------------------------------- conv op
@torch.library.custom_op("wf_kernels::conv2d_fwd", mutates_args=())
def conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha_weight: Tensor, alpha_bias: Optional[Tensor],
               rows: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int, path: str,
               save_z: bool) -> Tuple[Tensor, Tensor]:
    return conv2d_forward(x, weight, bias, alpha_weight, alpha_bias, rows, tuple(stride), tuple(padding),
                          tuple(dilation), groups, path, save_z)


@conv2d_fwd.register_fake
def _(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups, path, save_z):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    shp = out_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shp, dtype=x.dtype, device=x.device, memory_format=fmt)
    return out, (torch.empty_like(out) if save_z else x.new_empty(0))


# ----------------------------------------------------------------------------------------------------- backward op
@torch.library.custom_op("wf_kernels::gate_bwd", mutates_args=())
def gate_bwd(grad_out: Tensor, z: Tensor, bias: Optional[Tensor], alpha_weight: Tensor, alpha_bias: Optional[Tensor],
             rows: Tensor, channel_dim: int, deterministic: bool, need_gz: bool, need_aw: bool,
             need_ab: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return gate_backward(grad_out, z, bias, alpha_weight, alpha_bias, rows, channel_dim, deterministic, need_gz,
                         need_aw, need_ab)


@gate_bwd.register_fake
def _(grad_out, z, bias, alpha_weight, alpha_bias, rows, channel_dim, deterministic, need_gz, need_aw, need_ab):
    ref = z if z.numel() else grad_out
    if ref.dim() == 4 and is_channels_last(ref):
        gz = torch.empty(ref.shape, dtype=ref.dtype, device=ref.device, memory_format=torch.channels_last)
    else:
        gz = ref.new_empty(ref.shape)
    empty_a = alpha_weight.new_empty(0)
    return (gz if need_gz else grad_out.new_empty(0), torch.empty_like(alpha_weight) if need_aw else empty_a,
            torch.empty_like(alpha_weight) if need_ab else empty_a)


def _gate_b(alpha_bias, rows, dtype):
    return torch.sigmoid(alpha_bias.float()).index_select(0, rows).to(dtype)


def _grads_common(ctx, grad_out, channel_dim, recompute_z):
    x, weight, bias, aw, ab, rows, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_w, need_b, need_aw, need_ab = need[0], need[1], need[2], need[3], need[4]
    if need_aw and z.numel() == 0:  # called with save_z=False although A_w needs a grad: recompute z
        z = recompute_z(x, weight)
    gz, gaw, gab = torch.ops.wf_kernels.gate_bwd(
        grad_out, z, bias, aw, ab, rows, channel_dim, deterministic(), need_x or need_w, need_aw,
        need_ab and ab is not None)
    grad_b = None
    if need_b:
        reduce_dims = [d for d in range(grad_out.dim()) if d not in (0, grad_out.dim() - 1 if channel_dim < 0 else 1)]
        per_sample = grad_out.float().sum(reduce_dims) if reduce_dims else grad_out.float()  # [B, C]
        if ab is not None:
            per_sample = per_sample * _gate_b(ab, rows, torch.float32)
        grad_b = per_sample.sum(0).to(bias.dtype)
    return x, weight, gz, (gaw if need_aw else None), (gab if need_ab and ab is not None else None), grad_b


def _linear_setup(ctx, inputs, output):
    x, weight, bias, aw, ab, rows, path, save_z = inputs
    ctx.save_for_backward(x, weight, bias, aw, ab, rows, output[1])


def _linear_backward(ctx, grad_out, _grad_z_unused):
    x, weight, gz, gaw, gab, grad_b = _grads_common(ctx, grad_out, -1, lambda x, w: torch.matmul(x, w.t()))
    need = ctx.needs_input_grad
    grad_x = torch.matmul(gz, weight) if need[0] else None
    grad_w = torch.matmul(gz.reshape(-1, gz.shape[-1]).t(), x.reshape(-1, x.shape[-1])) if need[1] else None
    return grad_x, grad_w, grad_b, gaw, gab, None, None, None


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, aw, ab, rows, stride, padding, dilation, groups, path, save_z = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.save_for_backward(x, weight, bias, aw, ab, rows, output[1])


def _conv_backward(ctx, grad_out, _grad_z_unused):
    stride, padding, dilation, groups = ctx.conv
    x, weight, gz, gaw, gab, grad_b = _grads_common(
        ctx, grad_out, 1, lambda x, w: torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups))
    need = ctx.needs_input_grad
    grad_x = grad_w = None
    if need[0] or need[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            gz, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    return grad_x, grad_w, grad_b, gaw, gab, None, None, None, None, None, None, None


conv2d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------------------------------- functional API
def _save_z(alpha_weight) -> bool:
    return torch.is_grad_enabled() and alpha_weight.requires_grad


def wf_linear(x, weight, bias, alpha_weight, alpha_bias, rows, path: str | None = None):
    """Fused filtered linear on [B, ..., K] (rows: validated int64 [B]); ``path`` None = ``dispatch.linear_path``."""
    b, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, k)
    if not x3.is_contiguous():
        x3 = x3.contiguous()
    if path is None:
        path = dispatch.linear_path((x3.shape[0] * x3.shape[1], k), weight, x.dtype)[0]
    out, _ = torch.ops.wf_kernels.linear_fwd(x3, weight, bias, alpha_weight, alpha_bias, rows, path,
                                             _save_z(alpha_weight))
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


def wf_conv2d(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups,
              path: str | None = None):
    """Fused filtered conv2d (normalised args as the backends get them); ``path`` None = ``dispatch.conv_path``."""
    cl = is_channels_last(x)
    if not (cl or x.is_contiguous()):
        x = x.contiguous()
    if path is None:
        path = dispatch.conv_path(x, weight, stride, padding, dilation, groups, cl)[0]
    out, _ = torch.ops.wf_kernels.conv2d_fwd(x, weight, bias, alpha_weight, alpha_bias, rows, list(stride),
                                             list(padding), list(dilation), int(groups), path, _save_z(alpha_weight))
    return out
