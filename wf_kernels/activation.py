"""Elementwise activations folded into the gate epilogue (wfnet.fold): ``act(g' * z + gb')`` in the same pass.

``ACT`` is a constexpr string, so each activation is its own kernel variant and "none" compiles to nothing.
``activation`` is called right before the store of the forward epilogues; ``activation_grad`` gives d act / d pre at
the pre-activation ``pre`` (recomputed by the backward from the saved z and the gates), which the fused backward
multiplies into grad_out before anything else. Math in fp32; the torch statement is ``wfnet.fold.activate``
(ReLU, ReLU6, SiLU, GELU with the exact erf, Hardswish, Hardsigmoid as torch.nn.functional defines them).
"""
from __future__ import annotations

from typing import Literal

import triton
import triton.language as tl

# the activation names a launch wrapper takes (bench/aot_verify.py enumerates the Literal)
Activation = Literal["none", "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid"]
ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid")


def reference(x, act: str):
    """``act(x)`` in torch (torch.nn.functional's definitions, GELU with the exact erf): what ``activation``
    computes, for tests and the kernels' references."""
    import torch.nn.functional as F

    fns = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
           "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid}
    return fns[check_activation(act)](x)


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    return act


@triton.jit
def activation(x, ACT: tl.constexpr):
    """``act(x)`` for an fp32 tile."""
    if ACT == "relu":
        x = tl.maximum(x, 0.0)
    elif ACT == "relu6":
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif ACT == "silu":
        x = x * tl.sigmoid(x)
    elif ACT == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "hardswish":
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif ACT == "hardsigmoid":
        x = tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    return x


@triton.jit
def activation_grad(pre, ACT: tl.constexpr):
    """d act / d pre at ``pre`` (fp32 tile), with torch's conventions at the kinks (relu'(0) = 0, relu6' = 0 at 0
    and 6, hardswish' = x / 3 + 0.5 inside (-3, 3), 0 below -3, 1 from 3 on; hardsigmoid' = 1/6 inside (-3, 3))."""
    if ACT == "relu":
        d = tl.where(pre > 0.0, 1.0, 0.0)
    elif ACT == "relu6":
        d = tl.where((pre > 0.0) & (pre < 6.0), 1.0, 0.0)
    elif ACT == "silu":
        s = tl.sigmoid(pre)
        d = s * (1.0 + pre * (1.0 - s))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        d = cdf + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre)
    elif ACT == "hardswish":
        d = tl.where(pre < -3.0, 0.0, tl.where(pre <= 3.0, pre / 3.0 + 0.5, 1.0))
    elif ACT == "hardsigmoid":
        d = tl.where((pre > -3.0) & (pre < 3.0), 1.0 / 6.0, 0.0)
    else:
        d = tl.full(pre.shape, 1.0, tl.float32)
    return d
