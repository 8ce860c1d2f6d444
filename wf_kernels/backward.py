"""Fused backward of the gate: one pass over grad_out (and the saved bias-free output z).

For out[n, c, p] = g[r_n, c] * z[n, c, p] + gb[r_n, c] * b[c] with g = sigmoid(A_w), gb = sigmoid(A_b):

    grad_z[n, c, p]   = grad_out[n, c, p] * g[r_n, c]                  (then grad_x by cuBLAS / cuDNN from grad_z)
    grad_A_w[r, c]    = g'(A_w[r, c])        * sum_{n: r_n = r} sum_p grad_out * z
    grad_A_b[r, c]    = gb'(A_b[r, c]) * b[c] * sum_{n: r_n = r} sum_p grad_out

One program per (sample, channel block, position chunk) reads its tile of grad_out (and z) once, writes grad_z and
reduces the two sums over positions. The per-class-row reduction then has two modes:

* atomics (default): each program ``atomic_add``s its partial sums into fp32 [N_c, C] buffers; the summation order,
  hence the last bits, can vary run to run;
* deterministic (``torch.are_deterministic_algorithms_enabled()`` or ``deterministic=True``): one program per
  (sample, channel block) sums all positions in a fixed order into per-sample partials [B, C]; samples are stable-
  sorted by row (vLLM multi-LoRA style) and a segment kernel adds each row's samples in sorted order. Bitwise
  reproducible.

The sigmoid derivative is applied afterwards on the small [N_c, C] result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET, elementwise_tiles
from .epilogue import as_bcp


@triton.jit
def _gate_bwd_kernel(
    go_ptr, z_ptr, gz_ptr, rows_ptr, aw_ptr,
    acc_w_ptr, acc_b_ptr,  # atomics: [N_c, C] fp32 buffers; deterministic: per-sample partials [B, C] fp32
    C, P, P_CHUNK,
    stride_gn, stride_gc, stride_gp,  # grad_out as [B, C, P]
    stride_zn, stride_zc, stride_zp,  # z (and grad_z, allocated like z) as [B, C, P]
    NEED_GZ: tl.constexpr, NEED_AW: tl.constexpr, NEED_AB: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    row = tl.load(rows_ptr + n)
    g = tl.sigmoid(tl.load(aw_ptr + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32))
    sum_gz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    p_start = tl.program_id(2) * P_CHUNK
    p_end = tl.minimum(p_start + P_CHUNK, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < p_end)[None, :]
        go = tl.load(go_ptr + n * stride_gn + offs_c[:, None] * stride_gc + offs_p[None, :] * stride_gp, mask=mask,
                     other=0.0).to(tl.float32)
        zoff = n * stride_zn + offs_c[:, None] * stride_zc + offs_p[None, :] * stride_zp
        if NEED_GZ:
            tl.store(gz_ptr + zoff, (go * g[:, None]).to(gz_ptr.dtype.element_ty), mask=mask)
        if NEED_AW:
            z = tl.load(z_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
            sum_gz += tl.sum(go * z, axis=1)
        if NEED_AB:
            sum_g += tl.sum(go, axis=1)
    if ATOMIC:
        if NEED_AW:
            tl.atomic_add(acc_w_ptr + row * C + offs_c, sum_gz, mask=mask_c)
        if NEED_AB:
            tl.atomic_add(acc_b_ptr + row * C + offs_c, sum_g, mask=mask_c)
    else:
        if NEED_AW:
            tl.store(acc_w_ptr + n * C + offs_c, sum_gz, mask=mask_c)
        if NEED_AB:
            tl.store(acc_b_ptr + n * C + offs_c, sum_g, mask=mask_c)


@triton.jit
def _segment_sum_kernel(
    part_ptr, perm_ptr, seg_start_ptr, seg_row_ptr, out_ptr, C,
    BLOCK_C: tl.constexpr,
):
    """out[row_s, :] = sum over the samples of segment s (in sorted order) of part[sample, :]."""
    s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = tl.load(seg_start_ptr + s)
    end = tl.load(seg_start_ptr + s + 1)
    row = tl.load(seg_row_ptr + s)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(start, end):
        sample = tl.load(perm_ptr + i)
        acc += tl.load(part_ptr + sample * C + offs_c, mask=mask_c, other=0.0)
    tl.store(out_ptr + row * C + offs_c, acc, mask=mask_c)


def _segment_reduce(part: torch.Tensor, rows: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Deterministic per-row sums of per-sample partials [B, C] -> [N_c, C] (rows without samples stay 0)."""
    b, c = part.shape
    out = torch.zeros(num_classes, c, dtype=torch.float32, device=part.device)
    sorted_rows, perm = torch.sort(rows, stable=True)
    seg_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg_start = torch.zeros(seg_rows.numel() + 1, dtype=torch.long, device=part.device)
    torch.cumsum(counts, 0, out=seg_start[1:])
    bc = min(triton.next_power_of_2(c), 1024)
    _segment_sum_kernel[(seg_rows.numel(), triton.cdiv(c, bc))](part, perm, seg_start, seg_rows, out, c, BLOCK_C=bc)
    return out


def _p_chunk(b: int, n_cb: int, p: int, bp: int) -> int:
    """Positions per program in atomic mode: split P only as far as needed for ~4 waves of programs on a GPU."""
    target = 64 if INTERPRET else 132 * 4 * 4
    splits = max(1, min(triton.cdiv(p, bp), target // max(b * n_cb, 1)))
    return triton.cdiv(triton.cdiv(p, bp), splits) * bp


def gate_backward(grad_out, z, bias, alpha_weight, alpha_bias, rows, channel_dim: int, deterministic: bool,
                  need_gz: bool, need_aw: bool, need_ab: bool):
    """Return (grad_z, grad_alpha_weight, grad_alpha_bias); an entry not asked for is an empty tensor.

    ``grad_z`` has z's layout when z is given (else grad_out's, made dense); the alpha grads have alpha's dtype.
    ``grad_out`` is made dense in z's layout first so that one stride set serves both.
    """
    num_classes, c = alpha_weight.shape
    ref = z if z.numel() else grad_out
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        ref = ref.contiguous(memory_format=torch.channels_last)
    else:
        grad_out = grad_out.contiguous()
        ref = ref.contiguous()
    if need_aw and z.numel() == 0:
        raise RuntimeError("wf_kernels: grad for alpha_weight requested but z was not saved in forward")
    z = ref if z.numel() else z
    empty = grad_out.new_empty(0)
    grad_z = torch.empty_like(ref) if need_gz else empty
    aw = alpha_weight.contiguous()
    if grad_out.numel() == 0 or not (need_gz or need_aw or need_ab):
        zeros = torch.zeros_like(alpha_weight)
        return (grad_z if need_gz else empty, zeros if need_aw else alpha_weight.new_empty(0),
                torch.zeros_like(alpha_weight) if need_ab else alpha_weight.new_empty(0))
    g3 = as_bcp(grad_out, channel_dim)
    z3 = as_bcp(z if need_aw else ref, channel_dim)
    gz3 = as_bcp(grad_z, channel_dim) if need_gz else z3
    assert gz3.stride() == z3.stride() or not need_gz
    b, _, p = g3.shape
    bc, bp = elementwise_tiles(c, p, channels_contiguous=g3.stride(1) == 1 and c > 1)
    n_cb = triton.cdiv(c, bc)
    f32 = dict(dtype=torch.float32, device=grad_out.device)
    if deterministic:
        acc_w = torch.empty(b, c, **f32) if need_aw else torch.empty(1, **f32)
        acc_b = torch.empty(b, c, **f32) if need_ab else torch.empty(1, **f32)
        chunk = triton.cdiv(p, bp) * bp
    else:
        acc_w = torch.zeros(num_classes, c, **f32) if need_aw else torch.empty(1, **f32)
        acc_b = torch.zeros(num_classes, c, **f32) if need_ab else torch.empty(1, **f32)
        chunk = _p_chunk(b, n_cb, p, bp)
    grid = (b, n_cb, triton.cdiv(p, chunk))
    _gate_bwd_kernel[grid](
        g3, z3, gz3, rows, aw, acc_w, acc_b, c, p, chunk, *g3.stride(), *z3.stride(),
        NEED_GZ=need_gz, NEED_AW=need_aw, NEED_AB=need_ab, ATOMIC=not deterministic, BLOCK_C=bc, BLOCK_P=bp,
    )
    if deterministic:
        if need_aw:
            acc_w = _segment_reduce(acc_w, rows, num_classes)
        if need_ab:
            acc_b = _segment_reduce(acc_b, rows, num_classes)
    grad_aw, grad_ab = alpha_weight.new_empty(0), alpha_weight.new_empty(0)  # distinct: outputs may not alias
    if need_aw:
        s = torch.sigmoid(alpha_weight.float())
        grad_aw = (acc_w * s * (1 - s)).to(alpha_weight.dtype)
    if need_ab:
        s = torch.sigmoid(alpha_bias.float())
        grad_ab = (acc_b * s * (1 - s) * bias.float()).to(alpha_bias.dtype)
    return grad_z, grad_aw, grad_ab
