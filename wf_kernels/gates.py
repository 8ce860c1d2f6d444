"""Per-sample gates from the class-row gate logits, and the deterministic class reduction of their gradient.

    g[n, c] = sigmoid(A[r_n, c])                                        (forward: one sigmoid per sample and channel)
    grad_A[r, c] = sigmoid'(A[r, c]) * sum_{n: r_n = r} grad_g[n, c]    (backward)

Every fused kernel reads the gates as these [B, C] fp32 matrices (computed once per layer and batch, tiny next to the
activations) instead of gathering and sigmoiding logit tiles per output tile. The per-sample gradients [B, C] that the
fused backward produces are reduced into the class rows here: the samples come sorted by row with per-class segment
offsets (``perm``, ``starts``: built once per batch and shared by every layer, see ``wfnet.rows.Rows.segments``), and
a fixed grid of one program per (class row, channel block) sums its segment in sorted order and exits at once when
the class has no sample (vLLM's multi-LoRA scheme). No atomics, so the result is bitwise reproducible, and no host
sync to size the grid.

In this file: ``reference`` -> ``_class_grad_kernel`` -> the custom op ``wf_kernels::class_grad`` (launcher and op in
one: it is only ever called as the op) + fake -> ``gate_rows`` (op + fake + autograd into class_grad) ->
``sample_gates``, the gates every fused forward reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import device_guard


def reference(grad_g: Tensor, alpha: Tensor, rows: Tensor) -> Tensor:
    """grad_A of the formula above in fp32 torch (index_add over the rows), for tests."""
    s = torch.sigmoid(alpha.float())
    return torch.zeros_like(s).index_add_(0, rows, grad_g.float()) * s * (1 - s)


@triton.jit
def _class_grad_kernel(
    grad_ptr, perm_ptr, starts_ptr, alpha_ptr, out_ptr, C,
    BLOCK_C: tl.constexpr,
):
    """out[r, c] = sigmoid'(alpha[r, c]) * sum over the samples of class r's segment of grad[sample, c]."""
    r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = tl.load(starts_ptr + r)
    end = tl.load(starts_ptr + r + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(start, end):  # empty segment: no iteration, the row's gradient is 0
        sample = tl.load(perm_ptr + i)
        acc += tl.load(grad_ptr + sample * C + offs_c, mask=mask_c, other=0.0)
    s = tl.sigmoid(tl.load(alpha_ptr + r * C + offs_c, mask=mask_c, other=0.0).to(tl.float32))
    tl.store(out_ptr + r * C + offs_c, acc * s * (1.0 - s), mask=mask_c)


def segments(rows: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(perm, starts) for ``rows`` (what ``wfnet.rows.Rows.segments`` caches per batch): stable sort + class offsets."""
    sorted_rows, perm = torch.sort(rows, stable=True)
    return perm, torch.searchsorted(sorted_rows, torch.arange(num_classes + 1, device=rows.device))


def segments_fn(rows, num_classes, segs):
    """A zero-argument callable giving (perm, starts): ``segs`` itself when callable (shared per batch, e.g.
    ``wfnet.rows.LayerRows.segments``), the given pair, or built from ``rows`` for this call alone."""
    if callable(segs):
        return segs
    if segs is not None:
        return lambda: segs
    return lambda: segments(rows, num_classes)


@torch.library.custom_op("wf_kernels::class_grad", mutates_args=())
def class_grad(grad_g: Tensor, alpha: Tensor, perm: Tensor, starts: Tensor) -> Tensor:
    """grad of the logits [N_c, C] from per-sample gate grads [B, C] (fp32), deterministic (see module docstring).
    A custom op so that AOT autograd / torch.compile trace the backward with its fake kernel."""
    num_classes, c = alpha.shape
    out = torch.empty(num_classes, c, dtype=torch.float32, device=alpha.device)
    if out.numel() == 0:
        return out.to(alpha.dtype, copy=True)
    grad_g = grad_g.float().contiguous()
    bc = min(triton.next_power_of_2(c), 256)
    with device_guard(alpha):
        _class_grad_kernel[(num_classes, triton.cdiv(c, bc))](
            grad_g, perm, starts, alpha.float().contiguous(), out, c, BLOCK_C=bc)
    return out.to(alpha.dtype)


@class_grad.register_fake
def _(grad_g, alpha, perm, starts):
    return torch.empty_like(alpha)


@torch.library.custom_op("wf_kernels::gate_rows", mutates_args=())
def gate_rows(alpha: Tensor, rows: Tensor, perm: Tensor, starts: Tensor) -> Tensor:
    """sigmoid(alpha)[rows] as fp32 [B, C]; ``perm`` / ``starts`` are only read by the backward."""
    return torch.sigmoid(alpha.float()).index_select(0, rows)


@gate_rows.register_fake
def _(alpha, rows, perm, starts):
    return alpha.new_empty((rows.shape[0], alpha.shape[1]), dtype=torch.float32)


def _setup(ctx, inputs, output):
    alpha, rows, perm, starts = inputs
    ctx.save_for_backward(alpha, perm, starts)


def _backward(ctx, grad_g):
    alpha, perm, starts = ctx.saved_tensors
    grad_alpha = torch.ops.wf_kernels.class_grad(grad_g, alpha, perm, starts) if ctx.needs_input_grad[0] else None
    return grad_alpha, None, None, None


gate_rows.register_autograd(_backward, setup_context=_setup)


def sample_gates(alpha_weight: Tensor, alpha_bias: Tensor | None, bias: Tensor | None, rows: Tensor,
                 segments_fn) -> tuple[Tensor, Tensor | None]:
    """(g [B, C], gb [B, C] or None) in fp32: the weight gate and the gated bias ``sigmoid(A_b[r_n]) * b`` (``b``
    alone when the layer has no bias gates; None without bias). ``segments_fn()`` returns (perm, starts); it is only
    called when a gate logit needs a gradient."""
    def gather(alpha):
        if torch.is_grad_enabled() and alpha.requires_grad:
            perm, starts = segments_fn()
            return torch.ops.wf_kernels.gate_rows(alpha, rows, perm, starts)
        return torch.sigmoid(alpha.detach().float()).index_select(0, rows)

    g = gather(alpha_weight)
    if bias is None:
        return g, None
    b = bias.float()
    if alpha_bias is None:
        return g, b.unsqueeze(0).expand(rows.shape[0], -1)
    return g, gather(alpha_bias) * b
