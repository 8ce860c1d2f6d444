"""The "torch" backend: the plain conv / matmul, then the per-sample, per-channel gate as a broadcast epilogue.

    out[n] = sigmoid(A_w[r_n]) * (W * x[n]) + sigmoid(A_b[r_n]) * b

Masked weights are never built: the gate is per output channel, so it commutes with the convolution. The gate rows
are gathered with ``index_select``, whose backward is an ``index_add`` into the class rows, so there is no Python loop
over samples or classes. This is the reference the fused kernels are tested against, and the CPU default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..fold import ACT_GRAD_FROM_INPUT as _FROM_INPUT
from ..fold import ACT_GRAD_FROM_OUTPUT as _FROM_OUTPUT
from ..fold import ACT_NAMES, activate


def gate_dtype(alpha: torch.Tensor) -> torch.dtype:
    """The dtype the sigmoid runs in: at least fp32 (fp16 gates would round), fp64 kept (gradcheck)."""
    return torch.promote_types(alpha.dtype, torch.float32)


def gate_rows(alpha: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sigmoid(alpha)[rows] computed in at least fp32, returned in the activation dtype."""
    return torch.sigmoid(alpha.to(gate_dtype(alpha))).index_select(0, rows).to(dtype)


def apply_gate(z: torch.Tensor, bias, alpha_weight, alpha_bias, rows, channel_dim: int) -> torch.Tensor:
    """Gate the bias-free output ``z`` (sample dim 0, channels at ``channel_dim``) and add the gated bias.

    ``z`` must be a fresh tensor owned by the caller: when no gradient flows through it, it is overwritten.
    """
    shape = _gate_shape(z, channel_dim)
    dtype = torch.promote_types(z.dtype, torch.float32)  # the gates in at least fp32 (the epilogue casts to z's)
    gate = gate_rows(alpha_weight, rows, dtype).view(shape)
    gated_bias = None
    if bias is not None:
        if alpha_bias is None:  # ungated bias: one [C] vector for every sample
            gated_bias = bias.view([1] + shape[1:])
        else:
            gated_bias = (gate_rows(alpha_bias, rows, dtype) * bias.to(dtype)).view(shape)
    return gate_epilogue(z, gate, gated_bias, "none")


def sample_gates(alpha_weight, alpha_bias, bias, index: torch.Tensor):
    """(g, gb) fp32 [B, C] for class rows ``index``: ``sigmoid(A_w)[r]`` and the gated bias ``sigmoid(A_b)[r] * b``
    (``b`` when the layer has no bias gates; None without bias): the convention of ``wf_kernels.gates``."""
    g = gate_rows(alpha_weight, index, torch.float32)
    if bias is None:
        return g, None
    b = bias.float()
    if alpha_bias is None:
        return g, b.unsqueeze(0).expand(index.shape[0], -1)
    return g, gate_rows(alpha_bias, index, torch.float32) * b


def apply_sample_gates(z: torch.Tensor, g: torch.Tensor, gb, channel_dim: int, act: str = "none") -> torch.Tensor:
    """``act(z * g + gb)`` for per-sample gates given directly (g, gated bias gb: fp32 [B, C], e.g. composed for
    forget sets by ``wfnet.sets`` or folded with a BatchNorm by ``wfnet.fold``), broadcast over ``z``'s positions.
    Overwrites the fresh ``z`` when no graph is needed."""
    shape = _gate_shape(z, channel_dim)
    return gate_epilogue(z, g.view(shape), None if gb is None else gb.view(shape), act)


# ------------------------------------------------------------------------------------------------- the epilogue
# Why not ``torch.addcmul`` + the activation + autograd (the first version). Measured on the 2-core CPU (torch 2.14,
# one thread, fp32 [128, 64, 32, 32] = 33 MB, 2026-12-05):
# * every NEW tensor of that size costs ~12 ms of page faults (glibc hands big blocks back to the OS on free), about
#   ten passes over it: autograd's addcmul backward makes four (grad * gate, z * value, grad * that, the
#   activation's grad);
# * ``addcmul`` with [B, C, 1, 1] operands on an NCHW tensor runs a scalar loop: 7.7 ms in place against 1.3 ms for
#   one vectorised pass (``relu_``); with the gates varying along the innermost dim (channels_last, linear) it
#   vectorises;
# * each separate elementwise pass re-reads the tensor from memory: ``mul_``, ``add_``, ``relu_`` cost 1.3 ms each.
# So without a graph the epilogue writes into ``z`` in place (mul_ / add_ on NCHW, addcmul where the gates vary along
# the innermost dim, then the activation); with one, :class:`_GateEpilogue` runs it block by block along the batch
# (blocks of ``_BLOCK`` elements per thread, which stay in cache between the ops) and its backward allocates only the
# input gradient (the gate gradients are reduced per block from a block-sized scratch buffer). Measured side by side
# (``bench/epilogue_blocks.py``, ``bench/results/epilogue_blocks_2026-12-05.md``, ResNet-18, 1 thread): the
# untraining step 2272 ms in blocks vs 2332 ms in whole-tensor passes; the forward without a graph 924 ms whole vs
# 939 ms in blocks. Effect on the model ratios: ``bench/results/fold_cpu_2026-12-05_r3*.md``.
_BLOCK = 1 << 18  # elements per intra-op thread (1 MiB fp32)


def _gate_shape(z: torch.Tensor, channel_dim: int) -> list[int]:
    shape = [1] * z.dim()
    shape[0] = z.shape[0]
    shape[channel_dim] = z.shape[channel_dim]
    return shape


def _block_elements() -> int:
    """Elements per block: ``_BLOCK`` per intra-op thread (each op on a block is split across the threads, so each
    thread's share stays cache-sized and the per-op parallel overhead is paid on larger blocks)."""
    return _BLOCK * max(1, torch.get_num_threads())


def _blocks(z: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges ``[i, j)`` of ``z``'s dim 0 of about :func:`_block_elements` each (one range for a small ``z``, or
    one off the CPU)."""
    n = z.shape[0]
    if z.device.type != "cpu":
        return [(0, n)]  # on a GPU a block is a kernel launch per op, and there are no page faults to dodge
    per_row = max(1, math.prod(z.shape[1:]))
    block = _block_elements()
    if n * per_row <= 4 * block:
        return [(0, n)]
    k = max(1, block // per_row)
    return [(i, min(n, i + k)) for i in range(0, n, k)]


def _rows(t, i: int, j: int):
    """Rows i:j of a per-sample tensor; a tensor broadcast over the batch (dim 0 of size 1) as it is."""
    return t if t is None or t.shape[0] == 1 else t[i:j]


def _innermost(z: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the gates vary along ``z``'s innermost dim in memory (channels_last convs, linear layers)."""
    return any(z.stride(d) == 1 and g.shape[d] == z.shape[d] for d in range(1, z.dim()))


def _affine_into(out: torch.Tensor, z: torch.Tensor, g: torch.Tensor, b, one_pass: bool) -> torch.Tensor:
    """``out = z * g + b`` (``out`` may be ``z``); ``one_pass``: :func:`_innermost` of the whole tensor."""
    if b is None:
        return torch.mul(z, g, out=out)
    if one_pass:
        return torch.addcmul(b, z, g, out=out)  # one vectorised pass
    return torch.mul(z, g, out=out).add_(b)  # NCHW: two vectorised passes beat addcmul's scalar loop


def _act_into(out: torch.Tensor, pre: torch.Tensor, act: str) -> None:
    """``out = act(pre)`` (``out`` may be ``pre``)."""
    if act == "none":
        if out is not pre:
            out.copy_(pre)
    elif out is pre and act != "gelu":
        activate(pre, act, in_place=True)
    else:
        out.copy_(activate(pre, act, in_place=False))  # a block-sized temporary


def _epilogue_blocks(z, g, b, act, out, pre=None, blocks=None):
    """``out = act(z * g + b)`` block by block (``blocks``, default :func:`_blocks`; ``out`` may be ``z``); with
    ``pre`` also the pre-activation."""
    one_pass = _innermost(z, g)
    for i, j in blocks or _blocks(z):
        o = out[i:j]
        p = o if pre is None else pre[i:j]
        _affine_into(p, z[i:j], _rows(g, i, j), _rows(b, i, j), one_pass)
        _act_into(o, p, act)
    return out


def _reduce_dims(t: torch.Tensor, like: torch.Tensor) -> list[int]:
    """The dims of ``t`` that ``like`` broadcasts over."""
    return [d for d in range(t.dim()) if like.shape[d] == 1 and t.shape[d] != 1]


def _kept_shape(t: torch.Tensor, dims: list[int]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(t.shape)]


def _gather(total: torch.Tensor, i: int, j: int, part: torch.Tensor) -> None:
    """A block's reduced gradient into ``total``: its rows, or added up when ``total`` is one row for the batch."""
    if total.shape[0] == 1:
        total += part
    else:
        total[i:j] = part


def _sum(t: torch.Tensor, dims: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``t`` summed over ``dims`` (kept), accumulated in ``dtype`` (an empty ``dims`` sums nothing)."""
    return t.sum(dims, keepdim=True, dtype=dtype) if dims else t.to(dtype)


class _GateEpilogue(torch.autograd.Function):
    """``act(z * gate + gated_bias)`` with a hand-written, blocked backward (see the comment above): the gate
    gradients are ``sum(dpre * z)`` and ``sum(dpre)`` over the broadcast dims, the input gradient ``dpre * gate``;
    numerically the formula autograd differentiates (tests/test_torch_epilogue.py checks every activation, dtype,
    layout and combination of inputs needing gradients against it, and gradcheck in fp64)."""

    @staticmethod
    def forward(ctx, z, gate, gated_bias, act):
        if act not in ACT_NAMES:
            raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACT_NAMES)}")
        g = gate.to(z.dtype)
        b = None if gated_bias is None else gated_bias.to(z.dtype)
        y = torch.empty_like(z)
        pre = torch.empty_like(z) if act in _FROM_INPUT else None
        _epilogue_blocks(z, g, b, act, y, pre)
        ctx.act = act
        kept = y if act in _FROM_OUTPUT else pre
        ctx.save_for_backward(z if ctx.needs_input_grad[1] else None, gate, gated_bias, kept)
        return y

    @staticmethod
    @once_differentiable  # written with out= ops: a double backward raises a clear error instead
    def backward(ctx, dy):
        z, gate, gated_bias, kept = ctx.saved_tensors
        need_z, need_g, need_b = ctx.needs_input_grad[:3]
        act_grad = _FROM_OUTPUT.get(ctx.act) or _FROM_INPUT.get(ctx.act)
        acc = torch.promote_types(dy.dtype, torch.float32)
        g = gate.to(dy.dtype)
        d_z = torch.empty_like(dy, memory_format=torch.preserve_format) if need_z else None
        g_dims = _reduce_dims(dy, gate) if need_g else None
        b_dims = _reduce_dims(dy, gated_bias) if need_b else None
        d_g = torch.zeros(_kept_shape(dy, g_dims), dtype=acc, device=dy.device) if need_g else None
        d_b = torch.zeros(_kept_shape(dy, b_dims), dtype=acc, device=dy.device) if need_b else None
        scratch = None
        for i, j in _blocks(dy):
            dp = dy[i:j] if act_grad is None else act_grad(dy[i:j], kept[i:j])  # a block: stays in cache
            if need_b:
                _gather(d_b, i, j, _sum(dp, b_dims, acc))
            if need_g:
                if scratch is None:
                    scratch = torch.empty_like(dp)
                _gather(d_g, i, j, _sum(torch.mul(dp, z[i:j], out=scratch[: j - i]), g_dims, acc))
            if need_z:
                torch.mul(dp, _rows(g, i, j), out=d_z[i:j])
        return (d_z, None if d_g is None else d_g.to(gate.dtype), None if d_b is None else d_b.to(gated_bias.dtype),
                None)


def gate_epilogue(z: torch.Tensor, gate: torch.Tensor, gated_bias, act: str = "none") -> torch.Tensor:
    """The torch backend's epilogue: ``act(z * gate + gated_bias)``, gates already viewed to broadcast over ``z``
    (any float dtype; computed in ``z``'s dtype). ``z`` is a fresh tensor owned by the caller: without a graph to
    record it is overwritten (no new tensor); with one, :class:`_GateEpilogue` runs it."""
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, gate, gated_bias))
    if torch.compiler.is_compiling():
        # traced (torch.compile / torch.export): the functional formula, which the compiler fuses itself; no out=
        # variants (an exported program could not run them with grad enabled, the ONNX exporter would have to
        # functionalise them) and no Python loop over blocks unrolled into the graph
        g = gate.to(z.dtype)
        pre = z * g if gated_bias is None else torch.addcmul(gated_bias.to(z.dtype), z, g)
        return activate(pre, act, in_place=not needs_graph)
    if not needs_graph:
        # whole-tensor passes in place: measured faster than blocks when nothing is allocated (see above)
        g = gate.to(z.dtype)
        b = None if gated_bias is None else gated_bias.to(z.dtype)
        return _epilogue_blocks(z, g, b, act, z, blocks=[(0, z.shape[0])])
    return _GateEpilogue.apply(z, gate, gated_bias, act)


class TorchBackend:
    name = "torch"

    def unsupported(self, op, **args):
        return []  # runs anything PyTorch runs

    def conv2d(self, x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups):
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return apply_gate(z, bias, alpha_weight, alpha_bias, rows.index, channel_dim=1)

    def linear(self, x, weight, bias, alpha_weight, alpha_bias, rows):
        z = F.linear(x, weight)
        return apply_gate(z, bias, alpha_weight, alpha_bias, rows.index, channel_dim=z.dim() - 1)

    def sample_gates(self, alpha_weight, alpha_bias, bias, rows):
        return sample_gates(alpha_weight, alpha_bias, bias, rows.index)

    # per-sample gates given directly (forget sets, and the fold: see wfnet.ops); ``act``: the folded activation,
    # applied in place on the fresh gated tensor (wfnet.fold.activate)
    def conv2d_gates(self, x, weight, g, gb, stride, padding, dilation, groups, act="none"):
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return apply_sample_gates(z, g, gb, channel_dim=1, act=act)

    def linear_gates(self, x, weight, g, gb, act="none"):
        z = F.linear(x, weight)
        return apply_sample_gates(z, g, gb, channel_dim=z.dim() - 1, act=act)


BACKEND = TorchBackend()
