"""The "naive" backend: the paper's formula taken literally, one masked copy of the weights per sample.

    W_n = sigmoid(A_w[r_n])[:, None, None, None] * W,   b_n = sigmoid(A_b[r_n]) * b,   out[n] = conv(x[n], W_n) + b_n

The B masked weight tensors are materialised (B x C_out x C_in/groups x kH x kW) and run as one grouped convolution
with B*groups groups (a batched matmul for linear layers). It is the independent reference for tests and the slow
baseline of the benchmarks; "auto" never picks it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fold import activate
from .torch_ref import gate_dtype, sample_gates


def _masked(weight, bias, alpha_weight, alpha_bias, rows):
    dtype = weight.dtype
    g = torch.sigmoid(alpha_weight.to(gate_dtype(alpha_weight)))[rows].to(dtype)  # [B, C_out]
    w = weight.unsqueeze(0) * g.view(g.shape + (1,) * (weight.dim() - 1))  # [B, C_out, ...]
    b = None
    if bias is not None:
        if alpha_bias is None:
            gb = torch.ones_like(g)
        else:
            gb = torch.sigmoid(alpha_bias.to(gate_dtype(alpha_bias)))[rows].to(dtype)
        b = gb * bias.unsqueeze(0)  # [B, C_out]
    return w, b


def _masked_gates(weight, g, gb):
    """The masked weights [B, C_out, ...] and biases [B, C_out] from per-sample gates given directly."""
    dtype = weight.dtype
    w = weight.unsqueeze(0) * g.to(dtype).view(g.shape + (1,) * (weight.dim() - 1))
    return w, None if gb is None else gb.to(dtype)


class NaiveBackend:
    name = "naive"

    def unsupported(self, op, **args):
        return []

    def conv2d(self, x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups):
        w, b = _masked(weight.to(x.dtype), None if bias is None else bias.to(x.dtype), alpha_weight, alpha_bias, rows.index)
        return self._conv(x, weight, w, b, stride, padding, dilation, groups)

    def sample_gates(self, alpha_weight, alpha_bias, bias, rows):
        return sample_gates(alpha_weight, alpha_bias, bias, rows.index)

    def conv2d_gates(self, x, weight, g, gb, stride, padding, dilation, groups, act="none"):
        w, b = _masked_gates(weight.to(x.dtype), g, gb)
        return activate(self._conv(x, weight, w, b, stride, padding, dilation, groups), act, in_place=True)

    def _conv(self, x, weight, w, b, stride, padding, dilation, groups):
        n = x.shape[0]
        c_out = weight.shape[0]
        if n == 0:
            out = F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)
            return out
        # One grouped conv: sample n's channels form groups [n*groups, (n+1)*groups).
        xs = x.reshape(1, n * x.shape[1], x.shape[2], x.shape[3])
        out = F.conv2d(xs, w.reshape((n * c_out,) + tuple(weight.shape[1:])),
                       None if b is None else b.reshape(-1), stride, padding, dilation, groups * n)
        return out.reshape(n, c_out, out.shape[-2], out.shape[-1])

    def linear(self, x, weight, bias, alpha_weight, alpha_bias, rows):
        w, b = _masked(weight.to(x.dtype), None if bias is None else bias.to(x.dtype), alpha_weight, alpha_bias,
                       rows.index)
        return self._linear(x, weight, w, b)

    def linear_gates(self, x, weight, g, gb, act="none"):
        w, b = _masked_gates(weight.to(x.dtype), g, gb)
        return activate(self._linear(x, weight, w, b), act, in_place=True)

    def _linear(self, x, weight, w, b):
        n = x.shape[0]
        tokens = math.prod(x.shape[1:-1])  # explicit: reshape cannot infer -1 when B == 0
        xt = x.reshape(n, tokens, x.shape[-1])  # [B, T, F_in]
        out = torch.bmm(xt, w.transpose(1, 2))  # [B, T, F_out]
        if b is not None:
            out = out + b.unsqueeze(1)
        return out.reshape(x.shape[:-1] + (weight.shape[0],))


BACKEND = NaiveBackend()
