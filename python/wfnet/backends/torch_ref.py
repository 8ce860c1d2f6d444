"""The "torch" backend: the plain conv / matmul, then the per-sample, per-channel gate as a broadcast epilogue.

    out[n] = sigmoid(A_w[r_n]) * (W * x[n]) + sigmoid(A_b[r_n]) * b

Masked weights are never built: the gate is per output channel, so it commutes with the convolution. The gate rows
are gathered with ``index_select``, whose backward is an ``index_add`` into the class rows, so there is no Python loop
over samples or classes. This is the reference the fused kernels are tested against, and the CPU default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gate_rows(alpha: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sigmoid(alpha)[rows] computed in fp32 (alpha is kept in fp32), returned in the activation dtype."""
    return torch.sigmoid(alpha.float()).index_select(0, rows).to(dtype)


def apply_gate(z: torch.Tensor, bias, alpha_weight, alpha_bias, rows, channel_dim: int) -> torch.Tensor:
    """Gate the bias-free output ``z`` (sample dim 0, channels at ``channel_dim``) and add the gated bias."""
    shape = [1] * z.dim()
    shape[0] = z.shape[0]
    shape[channel_dim] = z.shape[channel_dim]
    out = z * gate_rows(alpha_weight, rows, z.dtype).view(shape)
    if bias is not None:
        gated_bias = bias.to(z.dtype) if alpha_bias is None else gate_rows(alpha_bias, rows, z.dtype) * bias.to(z.dtype)
        out = out + gated_bias.view(shape)
    return out


class TorchBackend:
    name = "torch"

    def unsupported(self, op, **args):
        return []  # runs anything PyTorch runs

    def conv2d(self, x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups):
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return apply_gate(z, bias, alpha_weight, alpha_bias, rows, channel_dim=1)

    def linear(self, x, weight, bias, alpha_weight, alpha_bias, rows):
        z = F.linear(x, weight)
        return apply_gate(z, bias, alpha_weight, alpha_bias, rows, channel_dim=z.dim() - 1)


BACKEND = TorchBackend()
