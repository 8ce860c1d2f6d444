"""Fused backward of the gate epilogue: one pass over grad_out (and the saved bias-free output z).

For out[n, c, p] = act(g[n, c] * z[n, c, p] + gb[n, c]) (sample gates g, gb: fp32 [B, C], see ``gates``; ``act`` a
folded activation, see activation.py, "none" = identity):

    go              = grad_out[n, c, p] * act'(g[n, c] * z[n, c, p] + gb[n, c])   (pre-activation recomputed from z)
    grad_z[n, c, p] = go * g[n, c]          (then grad_x by cuBLAS / cuDNN from grad_z)
    grad_g[n, c]    = sum_p go * z[n, c, p]
    grad_gb[n, c]   = sum_p go

One program per (sample, channel block, position chunk) reads its tile of grad_out (and z) once, writes grad_z and
reduces both sums over its positions into a [chunks, B, C] buffer; the chunks are then summed in a fixed order. No
atomics anywhere, so the result is bitwise reproducible. The per-class reduction of grad_g / grad_gb into the gate
logits happens in ``gates.class_grad`` (sorted segments shared by every layer of the batch), through autograd.

In this file: ``reference`` (the math in torch) -> ``_gate_bwd_kernel`` -> ``gate_backward`` (the launcher) -> the
custom op ``wf_kernels::gate_bwd`` + its fake -> ``fused_gate_grads`` / ``save_z_for_backward``, the part of the
autograd formulas of ``linear.py`` and ``conv2d.py`` that runs this op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activation import Activation, activation_grad, check_activation
from .autotune import INTERPRET, elementwise_tiles
from .epilogue import as_bcp, is_channels_last
from .launch import device_guard


def reference(grad_out: Tensor, z: Tensor, g: Tensor, channel_dim: int, gb: Tensor | None = None,
              act: Activation = "none") -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z, grad_g, grad_gb) of the formulas above in fp32 torch (autograd through ``act``): what the kernel
    computes, for tests."""
    from .activation import reference as act_reference

    go, zf = grad_out.float(), z.float()
    shape = [1] * zf.dim()
    shape[0], shape[channel_dim] = zf.shape[0], zf.shape[channel_dim]
    gv = g.float().reshape(shape)
    pre = zf * gv + (gb.float().reshape(shape) if gb is not None else 0.0)
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(act_reference(p, check_activation(act)), p, go)
    dims = [i for i in range(zf.dim()) if i not in (0, channel_dim % zf.dim())]
    grad_g = (d * zf).sum(dims) if dims else d * zf
    grad_gb = d.sum(dims) if dims else d
    return (d * gv).to(grad_out.dtype), grad_g, grad_gb


@triton.jit
def _gate_bwd_kernel(
    go_ptr, z_ptr, gz_ptr, g_ptr, gb_ptr, sum_gz_ptr, sum_g_ptr,  # sums: [chunks, B, C] fp32
    B, C, P, P_CHUNK, stride_gbn,
    stride_gn, stride_gc, stride_gp,  # grad_out as [B, C, P]
    stride_zn, stride_zc, stride_zp,  # z (and grad_z, allocated like z) as [B, C, P]
    NEED_GZ: tl.constexpr, NEED_G: tl.constexpr, NEED_GB: tl.constexpr, HAS_GB: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    mask_c = offs_c < C
    g = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    if HAS_GB:
        gb = tl.load(gb_ptr + n * stride_gbn + offs_c, mask=mask_c, other=0.0)
    sum_gz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    p_start = chunk * P_CHUNK
    p_end = tl.minimum(p_start + P_CHUNK, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < p_end)[None, :]
        go = tl.load(go_ptr + n * stride_gn + offs_c[:, None] * stride_gc + offs_p[None, :] * stride_gp, mask=mask,
                     other=0.0).to(tl.float32)
        zoff = n * stride_zn + offs_c[:, None] * stride_zc + offs_p[None, :] * stride_zp
        if ACT != "none":  # the folded activation: grad at the pre-activation, recomputed from z
            z = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
            pre = z * g[:, None]
            if HAS_GB:
                pre += gb[:, None]
            go = go * activation_grad(pre, ACT)
        if NEED_GZ:
            tl.store(gz_ptr + zoff, (go * g[:, None]).to(gz_ptr.dtype.element_ty), mask=mask)
        if NEED_G:
            if ACT == "none":
                z = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
            sum_gz += tl.sum(go * z, axis=1)
        if NEED_GB:
            sum_g += tl.sum(go, axis=1)
    out_off = (chunk * B + n) * C + offs_c
    if NEED_G:
        tl.store(sum_gz_ptr + out_off, sum_gz, mask=mask_c)
    if NEED_GB:
        tl.store(sum_g_ptr + out_off, sum_g, mask=mask_c)


def _p_chunk(b: int, n_cb: int, p: int, bp: int) -> int:
    """Positions per program: split P only as far as needed for ~4 waves of programs on a GPU (132 SMs x 4)."""
    target = 64 if INTERPRET else 132 * 4 * 4
    splits = max(1, min(triton.cdiv(p, bp), target // max(b * n_cb, 1)))
    return triton.cdiv(triton.cdiv(p, bp), splits) * bp


def gate_backward(grad_out, z, g, channel_dim: int, need_gz: bool, need_g: bool, need_gb: bool, gb=None,
                  act: Activation = "none"):
    """Return (grad_z, grad_g [B, C] fp32, grad_gb [B, C] fp32); an entry not asked for is an empty tensor.
    ``act`` (a folded activation) needs z and the gates ``g`` / ``gb`` of the forward for any gradient.

    ``grad_z`` has z's layout when z is given (else grad_out's, made dense); ``grad_out`` is made dense in that
    layout first so that one stride set serves both.
    """
    c = g.shape[1]
    ref = z if z.numel() else grad_out
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        ref = ref.contiguous(memory_format=torch.channels_last)
    else:
        grad_out = grad_out.contiguous()
        ref = ref.contiguous()
    if need_g and z.numel() == 0:
        raise RuntimeError("wf_kernels: grad for the weight gates requested but z was not saved in forward")
    if check_activation(act) != "none" and z.numel() == 0 and grad_out.numel():
        raise RuntimeError(f"wf_kernels: the backward of a folded {act} needs z (the pre-activation is recomputed)")
    z = ref if z.numel() else z
    if gb is not None and gb.stride(1) != 1:
        gb = gb.contiguous()
    empty = grad_out.new_empty(0)
    f32 = dict(dtype=torch.float32, device=grad_out.device)
    grad_z = torch.empty_like(ref) if need_gz else empty
    if grad_out.numel() == 0 or not (need_gz or need_g or need_gb):
        return (grad_z, torch.zeros(g.shape, **f32) if need_g else torch.empty(0, **f32),
                torch.zeros(g.shape, **f32) if need_gb else torch.empty(0, **f32))
    g3 = as_bcp(grad_out, channel_dim)
    z3 = as_bcp(z if (need_g or act != "none") else ref, channel_dim)
    gz3 = as_bcp(grad_z, channel_dim) if need_gz else z3
    assert gz3.stride() == z3.stride() or not need_gz
    b, _, p = g3.shape
    # 1K-element tiles, at most 64 channels: with the gate pass's 4K tiles ptxas -O3 spilled 4-40 B (in the loop for
    # some) to reach its occupancy target, at 56-168 registers, in 5-15 variants per arch and Triton version; 1K x 64
    # compiled every variant spill-free (bench/aot_verify.py, Triton 3.6 and 3.8, sm_80 and sm_90, 2026-12-05)
    bc, bp = elementwise_tiles(c, p, channels_contiguous=g3.stride(1) == 1 and c > 1, total=1024, max_c=64)
    n_cb = triton.cdiv(c, bc)
    chunk = _p_chunk(b, n_cb, p, bp)
    n_chunks = triton.cdiv(p, chunk)
    sum_gz = torch.empty(n_chunks, b, c, **f32) if need_g else torch.empty(1, **f32)
    sum_g = torch.empty(n_chunks, b, c, **f32) if need_gb else torch.empty(1, **f32)
    with device_guard(grad_out):
        _gate_bwd_kernel[(b, n_cb, n_chunks)](
            g3, z3, gz3, g.contiguous(), g if gb is None else gb, sum_gz, sum_g, b, c, p, chunk,
            0 if gb is None else gb.stride(0), *g3.stride(), *z3.stride(),
            NEED_GZ=need_gz, NEED_G=need_g, NEED_GB=need_gb, HAS_GB=gb is not None, ACT=act, BLOCK_C=bc,
            BLOCK_P=bp,
        )
    # fixed-order sums over the chunks (distinct tensors: custom-op outputs may not alias)
    grad_g = sum_gz.sum(0) if need_g else torch.empty(0, **f32)
    grad_gb = sum_g.sum(0) if need_gb else torch.empty(0, **f32)
    return grad_z, grad_g, grad_gb


# ------------------------------------------------------------------------------------------ custom op + fake kernel
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


# ------------------------------------------------------------------------- the shared part of the forward ops' autograd
def save_z_for_backward(g, act="none", *others) -> bool:
    """Whether a forward op stores z: for the weight gates' gradient; with a folded activation for any gradient (the
    backward recomputes the pre-activation from it)."""
    if not torch.is_grad_enabled():
        return False
    if act != "none":
        return any(t is not None and t.requires_grad for t in (g,) + others)
    return g.requires_grad


def fused_gate_grads(ctx, grad_out, channel_dim, recompute_z):
    """The fused gate backward of a forward op whose ctx saved (x, weight, g, gb, z) and ``act``: returns
    (x, weight, grad_z, grad_g or None, grad_gb or None); z is recomputed by ``recompute_z(x, weight)`` when the
    forward did not store it."""
    x, weight, g, gb, z = ctx.saved_tensors
    need_x, need_w, need_g, need_gb = ctx.needs_input_grad[:4]
    act = ctx.act
    if (need_g or act != "none") and z.numel() == 0:  # not saved in forward although needed: recompute z
        z = recompute_z(x, weight)
    gz, grad_g, grad_gb = torch.ops.wf_kernels.gate_bwd(grad_out, z, g, channel_dim, need_x or need_w, need_g,
                                                        need_gb, gb if act != "none" else None, act)
    return x, weight, gz, (grad_g if need_g else None), (grad_gb if need_gb else None)
