"""The per-sample gate as an epilogue: a ``@triton.jit`` helper for GEMM tiles, and one fused elementwise pass.

    out[n, c, p] = sigmoid(A_w[r_n, c]) * z[n, c, p] + sigmoid(A_b[r_n, c]) * b[c]

``gate_tile`` is inlined into the fused linear GEMM and the implicit-GEMM conv: it gathers the (BLOCK_M x BLOCK_N) gate
logits of each output row's class row straight from A_w / A_b (tiny, L2-resident), applies them to the fp32
accumulator and returns the tile to store. ``gate_forward`` is the other design: the plain cuDNN / cuBLAS output ``z``
followed by ONE Triton pass. It works on any [B, C, P] strided view (NCHW: p contiguous; channels_last and linear
[B, T, C]: c contiguous), one program per (sample, channel block, position block), so each program loads its sample's
gate row once. The gate is computed in fp32 and the result rounded once to the activation dtype. Gate logits must be
contiguous [N_c, C] (the launchers make them so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import elementwise_tiles


@triton.jit
def gate_tile(acc, sample, offs_c, mask_m, mask_c, rows_ptr, aw_ptr, ab_ptr, b_ptr, C,
              HAS_BIAS: tl.constexpr, HAS_AB: tl.constexpr):
    """Gate an fp32 tile ``acc`` [BLOCK_M, BLOCK_N]; ``sample`` [BLOCK_M] is each output row's sample index."""
    row = tl.load(rows_ptr + sample, mask=mask_m, other=0)
    mask = mask_m[:, None] & mask_c[None, :]
    goff = row[:, None] * C + offs_c[None, :]
    a = tl.load(aw_ptr + goff, mask=mask, other=0.0).to(tl.float32)
    out = acc * tl.sigmoid(a)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_AB:
            ab = tl.load(ab_ptr + goff, mask=mask, other=0.0).to(tl.float32)
            out += tl.sigmoid(ab) * b[None, :]
        else:
            out += b[None, :]
    return out


@triton.jit
def _gate_fwd_kernel(
    z_ptr, out_ptr, rows_ptr, aw_ptr, ab_ptr, b_ptr,
    C, P,
    stride_zn, stride_zc, stride_zp,  # z viewed as [B, C, P]
    stride_on, stride_oc, stride_op,  # out, same view
    HAS_BIAS: tl.constexpr, HAS_AB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_p < P)[None, :]
    row = tl.load(rows_ptr + n)
    g = tl.sigmoid(tl.load(aw_ptr + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32))
    z = tl.load(z_ptr + n * stride_zn + offs_c[:, None] * stride_zc + offs_p[None, :] * stride_zp, mask=mask,
                other=0.0).to(tl.float32)
    out = z * g[:, None]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_AB:
            b = b * tl.sigmoid(tl.load(ab_ptr + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32))
        out += b[:, None]
    tl.store(out_ptr + n * stride_on + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
             out.to(out_ptr.dtype.element_ty), mask=mask)


def as_bcp(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """View ``t`` as [B, C, P]: conv outputs [B, C, H, W] (channel_dim=1, NCHW or channels_last) and linear outputs
    [B, ..., C] (channel_dim=-1). Raises if the layout cannot be viewed without a copy (callers make it dense)."""
    if channel_dim == 1:
        return t.flatten(2) if t.dim() > 2 else t.unsqueeze(-1)
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def gate_forward(z: torch.Tensor, bias, alpha_weight, alpha_bias, rows, channel_dim: int) -> torch.Tensor:
    """out = gate(z) in one pass; ``out`` has z's shape, strides and dtype."""
    out = torch.empty_like(z)
    if z.numel() == 0:
        return out
    z3, o3 = as_bcp(z, channel_dim), as_bcp(out, channel_dim)
    b, c, p = z3.shape
    bc, bp = elementwise_tiles(c, p, channels_contiguous=z3.stride(1) == 1 and c > 1)
    grid = (b, triton.cdiv(c, bc), triton.cdiv(p, bp))
    aw = alpha_weight.contiguous()
    ab = alpha_bias.contiguous() if alpha_bias is not None else aw
    _gate_fwd_kernel[grid](
        z3, o3, rows, aw, ab, bias if bias is not None else aw,
        c, p, *z3.stride(), *o3.stride(),
        HAS_BIAS=bias is not None, HAS_AB=alpha_bias is not None, BLOCK_C=bc, BLOCK_P=bp,
    )
    return out
