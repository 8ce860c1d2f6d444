"""Functional weight-filtering ops: the torch statement of the math, which every backend must match (the Triton
kernels in ``wf_kernels/`` and the CUDA extension in ``csrc/`` implement it again, fused; their tests compare them
with the ``torch`` backend).

For a batch of B samples, each with a class row r_n in [0, N_c):

    wf_conv2d: out[n] = conv(x[n], sigmoid(A_w[r_n])[:, None, None, None] * W) + sigmoid(A_b[r_n]) * b
    wf_linear: out[n, t] = sigmoid(A_w[r_n]) * (W x[n, t]) + sigmoid(A_b[r_n]) * b      for every token t

``alpha_weight`` / ``alpha_bias`` are the raw gate logits [N_c, C_out] (the sigmoid is applied inside). ``rows`` is an
int64 tensor [B] (or one int for the whole batch); ``rows=None`` means the plain, unfiltered layer. A layer without
bias passes ``bias=None`` (and then ``alpha_bias`` must be None too).

Rows are validated by :class:`wfnet.rows.Rows` before any backend or kernel sees them: an out-of-range row raises
``ValueError`` naming the value and ``num_classes``. ``rows`` may also be a ``Rows`` prepared beforehand (e.g. once per
model forward, as the filtered layers do); then nothing is re-checked.

Forget SETS (``rows`` a bool mask [B, N_c] or a list of class lists, see :mod:`wfnet.sets`): sample n's gates are
the composition of its classes' rows, ``g_n = compose(sigmoid(A_w[r]) for r in set_n)`` (and the same for A_b), in
place of ``sigmoid(A[r_n])`` above. They are computed here in torch (so gradients reach A through the composition)
and given to the backend's ``conv2d_gates`` / ``linear_gates`` as per-sample gates (g, gated bias: fp32 [B, C]).

The fold (``fold=``, :mod:`wfnet.fold`): an eval-mode BatchNorm + activation after the layer, ``act(s * y + t)``, is
applied after the per-sample gates: ``g' = s * g``, ``gb' = s * gb + t``, handed to ``conv2d_gates`` /
``linear_gates`` with ``act=``; a backend that gathers the rows' gates in its own kernel (``folds_rows``: cuda) takes
the fold itself in ``conv2d`` / ``linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import resolve_backend
from .rows import LayerRows, Rows
from .sets import set_gates

__all__ = ["wf_conv2d", "wf_linear"]


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _check_alphas(weight, bias, alpha_weight, alpha_bias):
    c_out = weight.shape[0]
    if alpha_weight.dim() != 2 or alpha_weight.shape[1] != c_out:
        raise ValueError(f"alpha_weight must have shape [num_classes, {c_out}], got {list(alpha_weight.shape)}")
    if bias is None and alpha_bias is not None:
        raise ValueError("alpha_bias given for a layer without bias")
    if alpha_bias is not None and alpha_bias.shape != alpha_weight.shape:
        raise ValueError(f"alpha_bias must have the shape of alpha_weight {list(alpha_weight.shape)}, "
                         f"got {list(alpha_bias.shape)}")
    return alpha_weight.shape[0]


def _check_device(x, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}; move the layer or the input "
                             f"so that both are on the same device")


def _resolve_conv_padding(x, weight, stride, padding, dilation):
    """Turn "valid" / "same" / ints into a symmetric int pair, pre-padding x when "same" needs asymmetric padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (as in PyTorch)")
        pads = []
        for d, k in zip(dilation, weight.shape[2:]):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        if all(lo == hi for lo, hi in pads):
            return x, (pads[0][0], pads[1][0])
        # PyTorch's convention for odd total padding: the extra element goes to the end.
        x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        return x, (0, 0)
    return x, _pair(padding, "padding")


def wf_conv2d(x, weight, bias, alpha_weight, alpha_bias, rows, stride=1, padding=0, dilation=1, groups=1,
              backend=None, fold=None):
    """Filtered 2-d convolution (see the module docstring). ``x`` is [B, C_in, H, W], any memory format. ``fold``:
    a :class:`wfnet.fold.Affine` (an eval-mode BatchNorm + activation after the layer) applied in the same pass."""
    if rows is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() != 4:
        raise ValueError(f"wf_conv2d expects a 4-d input [B, C, H, W], got shape {list(x.shape)}")
    num_classes = _check_alphas(weight, bias, alpha_weight, alpha_bias)
    _check_device(x, weight=weight, bias=bias, alpha_weight=alpha_weight, alpha_bias=alpha_bias)
    rows = Rows.prepare(rows, num_classes, x.shape[0]).bind(x)
    return conv2d_prepared(x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups, backend,
                           fold)


def _fold_gates(chosen, alpha_weight, alpha_bias, bias, rows: LayerRows, fold):
    """The per-sample gates (fp32 [B, C]) with ``fold`` (a BatchNorm's affine) applied AFTER them: ``s * g``,
    ``s * gb + t`` (wfnet.fold). Sets compose first (wfnet.sets); rows use the backend's own gate gather."""
    if rows.mask is not None:
        g, gb = set_gates(alpha_weight, alpha_bias, bias, rows.mask)
    else:
        g, gb = chosen.sample_gates(alpha_weight, alpha_bias, bias, rows)
    return fold.gates(g, gb)


def conv2d_prepared(x, weight, bias, alpha_weight, alpha_bias, rows: LayerRows, stride, padding, dilation, groups,
                    backend=None, fold=None):
    """:func:`wf_conv2d` for rows already validated and bound to ``x`` (what the filtered layers call)."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    x, padding = _resolve_conv_padding(x, weight, stride, padding, dilation)
    args = dict(x=x, weight=weight, bias=bias, alpha_weight=alpha_weight, alpha_bias=alpha_bias, rows=rows,
                stride=stride, padding=padding, dilation=dilation, groups=int(groups))
    if fold is not None:
        args["fold"] = fold
    chosen = resolve_backend("conv2d", backend, args)
    if fold is not None and not getattr(chosen, "folds_rows", False):
        g, gb = _fold_gates(chosen, alpha_weight, alpha_bias, bias, rows, fold)
        return chosen.conv2d_gates(x, weight, g, gb, stride, padding, dilation, int(groups), act=fold.act)
    if rows.mask is not None:  # forget sets: gates composed here (differentiable), the backend applies them
        g, gb = set_gates(alpha_weight, alpha_bias, bias, rows.mask)
        return chosen.conv2d_gates(x, weight, g, gb, stride, padding, dilation, int(groups))
    return chosen.conv2d(**args)


def wf_linear(x, weight, bias, alpha_weight, alpha_bias, rows, backend=None, fold=None):
    """Filtered linear layer. ``x`` is [B, ..., F_in]; every token of sample n uses row ``rows[n]``. ``fold``: as in
    :func:`wf_conv2d` (channels are the last dimension)."""
    if rows is None:
        return F.linear(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"wf_linear expects an input [B, ..., F_in] with a batch dimension, got shape "
                         f"{list(x.shape)}")
    num_classes = _check_alphas(weight, bias, alpha_weight, alpha_bias)
    _check_device(x, weight=weight, bias=bias, alpha_weight=alpha_weight, alpha_bias=alpha_bias)
    rows = Rows.prepare(rows, num_classes, x.shape[0]).bind(x)
    return linear_prepared(x, weight, bias, alpha_weight, alpha_bias, rows, backend, fold)


def linear_prepared(x, weight, bias, alpha_weight, alpha_bias, rows: LayerRows, backend=None, fold=None):
    """:func:`wf_linear` for rows already validated and bound to ``x`` (what the filtered layers call)."""
    args = dict(x=x, weight=weight, bias=bias, alpha_weight=alpha_weight, alpha_bias=alpha_bias, rows=rows)
    if fold is not None:
        args["fold"] = fold
    chosen = resolve_backend("linear", backend, args)
    if fold is not None and not getattr(chosen, "folds_rows", False):
        g, gb = _fold_gates(chosen, alpha_weight, alpha_bias, bias, rows, fold)
        return chosen.linear_gates(x, weight, g, gb, act=fold.act)
    if rows.mask is not None:  # forget sets (see conv2d_prepared)
        g, gb = set_gates(alpha_weight, alpha_bias, bias, rows.mask)
        return chosen.linear_gates(x, weight, g, gb)
    return chosen.linear(**args)
