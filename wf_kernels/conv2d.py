"""Fused filtered conv2d: an implicit-GEMM Triton convolution with the gate epilogue, and the cuDNN + epilogue path.

    out[n] = g[n][:, None, None] * conv(x[n], W) + gb[n][:, None, None]     g = sigmoid(A_w)[rows], gb = sigmoid(A_b)[rows] * b

Implicit GEMM: M = B*H_out*W_out output pixels, N = C_out, K = C_in*kH*kW. Each program builds its [BLOCK_M, BLOCK_K]
input tile on the fly from x's strides (so NCHW and channels_last both work without a copy; zero padding is a load
mask), multiplies by the [BLOCK_K, BLOCK_N] weight tile, and applies ``epilogue.gate_tile`` with sample = m // (H_out
W_out) before the single store. fp32 operands use TF32 only where torch allows it for convolutions
(``torch.backends.cudnn.allow_tf32``, see ``launch.dot_precision``), as cuDNN does. The K order is (kh, kw, c) with c fastest for channels_last inputs (contiguous loads)
and (c, kh, kw) for NCHW. groups=1 only; grouped / depthwise convs go to the epilogue path.

Epilogue path: cuDNN ``F.conv2d`` without bias, then ONE fused Triton gate pass (``epilogue.gate_forward``).
Which path a shape takes is decided by ``dispatch.conv_path`` (measured, else roofline-predicted, per shape; with
neither, epilogue), which also says why.

Output memory format follows the input: channels_last in, channels_last out (as cuDNN does). Offsets are int32:
tensors of 2**31 elements or more are refused by the backend's ``unsupported``.

In this file: ``reference`` -> ``_wf_conv2d_fwd_kernel`` -> ``conv2d_forward`` (the launcher) -> the custom op
``wf_kernels::conv2d_fwd`` + fake -> its autograd (the fused gate backward of ``backward.py``, then cuDNN's
convolution backward for grad_x / grad_W) -> ``wf_conv2d``, the functional entry the "triton" backend calls.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import dispatch
from .activation import Activation, check_activation
from .autotune import gemm_configs, grouped_tile, m_bucket, prune_configs
from .backward import fused_gate_grads, save_z_for_backward
from .epilogue import gate_forward, gate_store, is_channels_last
from .epilogue import reference as epilogue_reference
from .gates import sample_gates, segments_fn
from .launch import device_guard, dot_precision


def reference(x: Tensor, weight: Tensor, g: Tensor, gb: Tensor | None, stride, padding, dilation, groups=1,
              act: Activation = "none") -> Tensor:
    """``act(g * conv(x, W) + gb)`` per sample in fp32 torch, rounded to x's dtype, for tests."""
    z = F.conv2d(x.float(), weight.float(), None, stride, padding, dilation, groups)
    return epilogue_reference(z, g, gb, 1, act).to(x.dtype)


# C_in is in the key beside K_total: whether C_in is a multiple of 16 changes which configs compile spill-free
# (autotune.operands_aligned), and two convs with one K_total may differ there
@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "C_in", "C_out", "K_total", "C_INNER", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _wf_conv2d_fwd_kernel(
    x_ptr, w_ptr, g_ptr, gb_ptr, out_ptr, z_ptr,
    C_in, H, W, C_out, H_out, W_out, M, K_total, M_BUCKET, stride_gbn,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_on, stride_oc, stride_oh, stride_ow,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, C_INNER: tl.constexpr,
    HAS_GB: tl.constexpr, STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, ACT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, C_out, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < C_out
    hw = H_out * W_out
    sample = offs_m // hw
    pix = offs_m % hw
    oh = pix // W_out
    ow = pix % W_out
    ih0 = oh * conv_sh - pad_h
    iw0 = ow * conv_sw - pad_w
    x_base = sample * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K_total, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        mask_k = kk < K_total
        if C_INNER:
            c = kk % C_in
            r = kk // C_in
        else:
            c = kk // (KH * KW)
            r = kk % (KH * KW)
        kh = r // KW
        kw = r % KW
        ih = ih0[:, None] + kh[None, :] * dil_h
        iw = iw0[:, None] + kw[None, :] * dil_w
        a_mask = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + x_base[:, None] + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
                    mask=a_mask, other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wo + c[:, None] * stride_wi + kh[:, None] * stride_wh
                    + kw[:, None] * stride_ww, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    gate_store(acc, sample, sample * stride_on + oh * stride_oh + ow * stride_ow, pid_n * BLOCK_N, mask_m, g_ptr,
               gb_ptr, out_ptr, z_ptr, C_out, stride_gbn, stride_oc, HAS_GB, STORE_Z, BLOCK_M, BLOCK_N,
               EPILOGUE_SUBTILES, ACT)


def out_shape(x_shape, w_shape, stride, padding, dilation):
    h, w = x_shape[2], x_shape[3]
    kh, kw = w_shape[2], w_shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (x_shape[0], w_shape[0], ho, wo)


def conv2d_forward(x, weight, g, gb, stride, padding, dilation, groups, path: str, save_z: bool, precision: str,
                   act: Activation = "none"):
    """(out, z or an empty tensor). ``x`` must be NCHW- or channels_last-contiguous; ``g`` / ``gb``: fp32 [B, C_out]
    sample gates (gb None without bias); ``act``: a folded activation applied to the gated output (wfnet.fold); ``path``: "implicit_gemm" or "epilogue". An argument added here that
    selects a kernel variant must be annotated bool / typing.Literal[...] / an Enum: bench/aot_verify.py enumerates
    such arguments from the annotation and compiles every variant for sm_90 / sm_80."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    empty = x.new_empty(0)
    if path == "epilogue":
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups).contiguous(memory_format=fmt)
        return gate_forward(z, g, gb, channel_dim=1, in_place=not save_z, act=act), (z if save_z else empty)
    if path != "implicit_gemm":
        raise ValueError(f"unknown conv path {path!r}; expected 'implicit_gemm' or 'epilogue'")
    if groups != 1:
        raise ValueError("the implicit-GEMM conv supports groups=1 only; use the 'epilogue' path")
    b, c_in, h, w = x.shape
    _, c_out, ho, wo = shp = out_shape(x.shape, weight.shape, stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv output would be empty: input {list(x.shape)}, kernel {list(weight.shape[2:])}")
    out = torch.empty(shp, dtype=x.dtype, device=x.device, memory_format=fmt)
    z = torch.empty(shp, dtype=x.dtype, device=x.device, memory_format=fmt) if save_z else empty
    m = b * ho * wo
    if m == 0 or c_out == 0:
        return out, z
    kh, kw = weight.shape[2], weight.shape[3]
    k_total = c_in * kh * kw
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(x):
        _wf_conv2d_fwd_kernel[grid](
            x, weight, g, gb if gb is not None else g, out, z if save_z else out,
            c_in, h, w, c_out, ho, wo, m, k_total, m_bucket(m), gb.stride(0) if gb is not None else 0,
            *x.stride(), *weight.stride(), *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, C_INNER=fmt == torch.channels_last,
            HAS_GB=gb is not None, STORE_Z=save_z, INPUT_PRECISION=precision, ACT=check_activation(act),
        )
    return out, z


# ------------------------------------------------------------------------------------------ custom op + fake kernel
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


# ------------------------------------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    x, weight, g, gb, stride, padding, dilation, groups, path, save_z, precision, *act = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.act = act[0] if act else "none"
    ctx.save_for_backward(x, weight, g, gb if ctx.act != "none" else None, output[1])


def _backward(ctx, grad_out, _grad_z_unused):
    stride, padding, dilation, groups = ctx.conv
    x, weight, gz, grad_g, grad_gb = fused_gate_grads(
        ctx, grad_out, 1, lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, groups))
    need = ctx.needs_input_grad
    grad_x = grad_w = None
    if need[0] or need[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            gz, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    return grad_x, grad_w, grad_g, grad_gb, None, None, None, None, None, None, None, None


conv2d_fwd.register_autograd(_backward, setup_context=_setup)


# -------------------------------------------------------------------------------------------------- functional API
def wf_conv2d(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups, segments=None,
              path: str | None = None, gates=None, act: str = "none"):
    """Fused filtered conv2d (normalised args as the backends get them; ``segments``, ``gates`` and ``act`` as in
    ``linear.wf_linear``); ``path`` None = ``dispatch.conv_path``."""
    cl = is_channels_last(x)
    if not (cl or x.is_contiguous()):
        x = x.contiguous()
    if path is None:
        path = dispatch.conv_path(x, weight, stride, padding, dilation, groups, cl)[0]
    g, gb = gates if gates is not None else sample_gates(alpha_weight, alpha_bias, bias, rows,
                                                         segments_fn(rows, alpha_weight.shape[0], segments))
    out, _ = torch.ops.wf_kernels.conv2d_fwd(x, weight, g, gb, list(stride), list(padding), list(dilation),
                                             int(groups), path, save_z_for_backward(g, act, gb, x, weight),
                                             dot_precision("conv2d", x.dtype), act)
    return out
