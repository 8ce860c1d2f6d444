"""The per-sample gate as an epilogue: a ``@triton.jit`` helper for GEMM tiles, and one fused elementwise pass.

    out[n, c, p] = g[n, c] * z[n, c, p] + gb[n, c]      g = sigmoid(A_w)[rows], gb = sigmoid(A_b)[rows] * b  ([B, C])

The per-sample gates g / gb are computed once per layer call (``gates.sample_gates``: one sigmoid per sample and
channel). ``gate_tile`` is inlined into the fused linear GEMM and the implicit-GEMM conv: it loads each output row's
sample gates (tiny, L2-resident), applies them to the fp32 accumulator and returns the tile to store.
``gate_forward`` is the other design: the plain cuDNN / cuBLAS output ``z`` followed by ONE Triton pass. It works on
any [B, C, P] strided view (NCHW: p contiguous; channels_last and linear [B, T, C]: c contiguous), one program per
(sample, channel block, position block), so each program loads its sample's gate row once; at inference it writes in place over z. The result is computed in fp32 and rounded once to the
activation dtype. ``g`` must be contiguous [B, C]; ``gb`` may have sample stride 0 (an ungated bias).

In this file: ``reference`` -> the ``@triton.jit`` epilogue helpers of the GEMMs (``gate_tile``, ``gate_store``) ->
``_gate_fwd_kernel`` -> ``gate_forward`` (the launcher; no custom op of its own: it runs inside the forward ops of
``linear.py`` / ``conv2d.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import Activation, activation, check_activation
from .autotune import elementwise_tiles
from .launch import device_guard


def reference(z: torch.Tensor, g: torch.Tensor, gb, channel_dim: int, act: Activation = "none") -> torch.Tensor:
    """``act(g * z + gb)`` in fp32 torch, rounded once to z's dtype: what ``gate_forward`` (and ``gate_store`` inside
    the GEMMs) computes, for tests."""
    from .activation import reference as act_reference

    shape = [1] * z.dim()
    shape[0], shape[channel_dim] = z.shape[0], z.shape[channel_dim]
    out = z.float() * g.float().reshape(shape)
    if gb is not None:
        out = out + gb.float().reshape(shape)
    return act_reference(out, check_activation(act)).to(z.dtype)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is stored channels_last (and not also plain-contiguous, e.g. C == 1 or H == W == 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@triton.jit
def gate_tile(acc, sample, offs_c, mask_m, mask_c, g_ptr, gb_ptr, C, stride_gbn, HAS_GB: tl.constexpr):
    """Gate an fp32 tile ``acc`` [BLOCK_M, BLOCK_N]; ``sample`` [BLOCK_M] is each output row's sample index.
    ``g`` is [B, C] contiguous, ``gb`` [B, C] with sample stride ``stride_gbn`` (0 for a bias shared by all)."""
    mask = mask_m[:, None] & mask_c[None, :]
    g = tl.load(g_ptr + sample[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    out = acc * g
    if HAS_GB:
        out += tl.load(gb_ptr + sample[:, None] * stride_gbn + offs_c[None, :], mask=mask, other=0.0)
    return out


@triton.jit
def _gate_store_cols(acc, sample, row_off, offs_c, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C, stride_gbn, stride_oc,
                     HAS_GB: tl.constexpr, STORE_Z: tl.constexpr, ACT: tl.constexpr):
    """Store one column block of the accumulator: z (when asked) and the gated output (then ``ACT``, a folded
    activation, see activation.py)."""
    mask_c = offs_c < C
    mask = mask_m[:, None] & mask_c[None, :]
    off = row_off[:, None] + offs_c[None, :] * stride_oc
    if STORE_Z:
        tl.store(z_ptr + off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    out = activation(gate_tile(acc, sample, offs_c, mask_m, mask_c, g_ptr, gb_ptr, C, stride_gbn, HAS_GB), ACT)
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_store(acc, sample, row_off, col0, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C, stride_gbn, stride_oc,
               HAS_GB: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SUBTILES: tl.constexpr, ACT: tl.constexpr):
    """The GEMM epilogue: gate the fp32 accumulator [BLOCK_M, BLOCK_N] (output columns ``col0 + arange(BLOCK_N)``,
    rows at ``row_off`` with sample index ``sample``) and store it, with z stored first when ``STORE_Z``.

    The gathered gate and gated bias are [BLOCK_M, BLOCK_N] fp32 tiles, as large as the accumulator itself; loaded
    for the whole tile, they triple the epilogue's live registers and made every config with 64+ accumulators per
    thread spill (bench/results/aot_*). With ``SUBTILES`` = 2 (or 4) the accumulator is split into column blocks
    (reshape / permute / split, as Triton's persistent-matmul tutorial does for its epilogue) and each block is
    gated and stored on its own, so only one block's gates are live at a time."""
    if SUBTILES == 4:
        a = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(a)
        a0, a1 = tl.split(tl.permute(tl.reshape(left, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
        a2, a3 = tl.split(tl.permute(tl.reshape(right, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
        q = tl.arange(0, BLOCK_N // 4)
        _gate_store_cols(a0, sample, row_off, col0 + q, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C, stride_gbn,
                         stride_oc, HAS_GB, STORE_Z, ACT)
        _gate_store_cols(a1, sample, row_off, col0 + BLOCK_N // 4 + q, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C,
                         stride_gbn, stride_oc, HAS_GB, STORE_Z, ACT)
        _gate_store_cols(a2, sample, row_off, col0 + BLOCK_N // 2 + q, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C,
                         stride_gbn, stride_oc, HAS_GB, STORE_Z, ACT)
        _gate_store_cols(a3, sample, row_off, col0 + 3 * (BLOCK_N // 4) + q, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr,
                         C, stride_gbn, stride_oc, HAS_GB, STORE_Z, ACT)
    elif SUBTILES == 2:
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        h = tl.arange(0, BLOCK_N // 2)
        _gate_store_cols(a0, sample, row_off, col0 + h, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C, stride_gbn,
                         stride_oc, HAS_GB, STORE_Z, ACT)
        _gate_store_cols(a1, sample, row_off, col0 + BLOCK_N // 2 + h, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, C,
                         stride_gbn, stride_oc, HAS_GB, STORE_Z, ACT)
    else:
        _gate_store_cols(acc, sample, row_off, col0 + tl.arange(0, BLOCK_N), mask_m, g_ptr, gb_ptr, out_ptr, z_ptr,
                         C, stride_gbn, stride_oc, HAS_GB, STORE_Z, ACT)


@triton.jit
def _gate_fwd_kernel(
    z_ptr, out_ptr, g_ptr, gb_ptr,
    C, P, stride_gbn,
    stride_zn, stride_zc, stride_zp,  # z viewed as [B, C, P]
    stride_on, stride_oc, stride_op,  # out, same view (may be z itself: in place)
    HAS_GB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACT: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_p < P)[None, :]
    g = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    z = tl.load(z_ptr + n * stride_zn + offs_c[:, None] * stride_zc + offs_p[None, :] * stride_zp, mask=mask,
                other=0.0).to(tl.float32)
    out = z * g[:, None]
    if HAS_GB:
        out += tl.load(gb_ptr + n * stride_gbn + offs_c, mask=mask_c, other=0.0)[:, None]
    out = activation(out, ACT)
    tl.store(out_ptr + n * stride_on + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
             out.to(out_ptr.dtype.element_ty), mask=mask)


def as_bcp(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """View ``t`` as [B, C, P]: conv outputs [B, C, H, W] (channel_dim=1, NCHW or channels_last) and linear outputs
    [B, ..., C] (channel_dim=-1). Raises if the layout cannot be viewed without a copy (callers make it dense)."""
    if channel_dim == 1:
        return t.flatten(2) if t.dim() > 2 else t.unsqueeze(-1)
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def gate_forward(z: torch.Tensor, g: torch.Tensor, gb, channel_dim: int, in_place: bool = False,
                 act: Activation = "none") -> torch.Tensor:
    """out = act(z * g + gb) in one pass (``act``: a folded activation, "none" by default) (``g``, ``gb``: fp32 [B, C]); ``out`` has z's shape, strides and dtype. With
    ``in_place`` z itself is overwritten and returned (inference: z is a fresh conv / matmul output). An argument
    added here that selects a kernel variant must be annotated bool / typing.Literal[...] / an Enum:
    bench/aot_verify.py enumerates such arguments from the annotation and compiles every variant for sm_90 / sm_80."""
    out = z if in_place else torch.empty_like(z)
    if z.numel() == 0:
        return out
    z3, o3 = as_bcp(z, channel_dim), as_bcp(out, channel_dim)
    b, c, p = z3.shape
    bc, bp = elementwise_tiles(c, p, channels_contiguous=z3.stride(1) == 1 and c > 1)
    grid = (b, triton.cdiv(c, bc), triton.cdiv(p, bp))
    with device_guard(z):
        _gate_fwd_kernel[grid](
            z3, o3, g, gb if gb is not None else g, c, p, gb.stride(0) if gb is not None else 0,
            *z3.stride(), *o3.stride(),
            HAS_GB=gb is not None, BLOCK_C=bc, BLOCK_P=bp, ACT=check_activation(act),
        )
    return out
