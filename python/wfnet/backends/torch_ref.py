"""The "torch" backend: the plain conv / matmul, then the per-sample, per-channel gate as a broadcast epilogue.

    out[n] = sigmoid(A_w[r_n]) * (W * x[n]) + sigmoid(A_b[r_n]) * b

Masked weights are never built: the gate is per output channel, so it commutes with the convolution. The gate rows
are gathered with ``index_select``, whose backward is an ``index_add`` into the class rows, so there is no Python loop
over samples or classes. This is the reference the fused kernels are tested against, and the CPU default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fold import activate


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
    shape = [1] * z.dim()
    shape[0] = z.shape[0]
    shape[channel_dim] = z.shape[channel_dim]
    gate = gate_rows(alpha_weight, rows, z.dtype).view(shape)
    gated_bias = None
    if bias is not None:
        if alpha_bias is None:  # ungated bias: one [C] vector for every sample
            gated_bias = bias.to(z.dtype).view([1] + shape[1:])
        else:
            gated_bias = (gate_rows(alpha_bias, rows, z.dtype) * bias.to(z.dtype)).view(shape)
    # z is a fresh tensor made by the caller: when autograd does not need it, overwrite it instead of allocating
    # (on CPU the new output's page faults cost about as much as the epilogue itself).
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, gate, gated_bias))
    # under torch.export: the functional op, so the exported program has no out= variant (it could not run with
    # grad enabled, and the ONNX exporter would have to functionalise it)
    out = None if needs_graph or torch.compiler.is_exporting() else z
    if gated_bias is None:
        return torch.mul(z, gate, out=out)
    # one pass over z (gated_bias + z * gate): "z * gate + gated_bias" reads and writes the big tensor twice
    return torch.addcmul(gated_bias, z, gate, out=out)


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


def apply_sample_gates(z: torch.Tensor, g: torch.Tensor, gb, channel_dim: int) -> torch.Tensor:
    """``z * g + gb`` for per-sample gates given directly (g, gated bias gb: fp32 [B, C], e.g. composed for forget
    sets by ``wfnet.sets``), broadcast over ``z``'s positions. Overwrites the fresh ``z`` when no graph is needed."""
    shape = [1] * z.dim()
    shape[0] = z.shape[0]
    shape[channel_dim] = z.shape[channel_dim]
    gate = g.to(z.dtype).view(shape)
    gated_bias = None if gb is None else gb.to(z.dtype).view(shape)
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, gate, gated_bias))
    out = None if needs_graph or torch.compiler.is_exporting() else z
    if gated_bias is None:
        return torch.mul(z, gate, out=out)
    return torch.addcmul(gated_bias, z, gate, out=out)


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
        return activate(apply_sample_gates(z, g, gb, channel_dim=1), act, in_place=True)

    def linear_gates(self, x, weight, g, gb, act="none"):
        z = F.linear(x, weight)
        return activate(apply_sample_gates(z, g, gb, channel_dim=z.dim() - 1), act, in_place=True)


BACKEND = TorchBackend()
