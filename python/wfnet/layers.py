"""Weight-filtering layers: a frozen conv / linear layer plus a per-class gate matrix per output channel.

``WFConv2d`` and ``WFLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``, so they keep the original ``weight`` / ``bias``
parameters (same names, same state-dict keys, frozen with ``requires_grad=False``) and every option of the original
layer. They add ``alpha_weight`` [num_classes, out] and, when the layer has a bias, ``alpha_bias`` [num_classes, out]:
raw gate logits, initialised to ``init`` (3.0 -> sigmoid 0.95), kept in fp32. Row r scales output channel j by
sigmoid(alpha_weight[r, j]) and its bias by sigmoid(alpha_bias[r, j]) (method.md section 2; **decision**: one gate per
output channel / feature, not per weight element).

Rows come from the ``forget=`` argument or, inside a wrapped model, from the model's router. No rows means the
original layer, computed by the original ``nn.Conv2d`` / ``nn.Linear`` forward (bit for bit).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .rows import LayerRows, RowRouter, Rows

__all__ = ["WFConv2d", "WFLinear", "FilteredLayer"]


def _autocast(x, weight, bias):
    """Apply autocast's cast for conv/linear here, since fused backends run under a disabled autocast."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), True
    return x, weight, bias, False


class FilteredLayer:
    """Mixin shared by the filtered layers: gate parameters, row lookup, gate inspection."""

    num_classes: int
    _router: RowRouter | None
    # Set by an attention adapter whose layer runs on a folded batch (leading size k*B, each sample's k entries
    # consecutive, e.g. window attention): the sample's row is repeated k times. Never inferred from sizes.
    folded_batch: bool = False

    def _init_filters(self, num_classes: int, init: float, out_features: int, has_bias: bool, device):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.init = float(init)
        self._router = None
        self.alpha_weight = nn.Parameter(torch.full((num_classes, out_features), float(init), device=device))
        if has_bias:
            self.alpha_bias = nn.Parameter(torch.full((num_classes, out_features), float(init), device=device))
        else:
            self.register_parameter("alpha_bias", None)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def _rows(self, x, forget) -> LayerRows | None:
        """Rows for this call, bound to ``x``: an explicit ``forget`` (validated here), else the router's (validated
        once per model forward, when routed; nothing is re-checked here)."""
        if forget is not None:
            self._check_input_device(x)  # first: moving rows to a wrong device would fail less clearly
            return Rows.prepare(forget, self.num_classes, None if self.folded_batch else x.shape[0]).bind(
                x, self.folded_batch)
        if self._router is not None:
            return self._router.rows_for(self, x, self.folded_batch)
        return None

    def _check_input_device(self, x):
        if x.device != self.weight.device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device} but the layer is on "
                             f"{self.weight.device}; move one of them")

    @torch.no_grad()
    def gate(self, row: int, which: str = "weight") -> torch.Tensor:
        """sigmoid(alpha[row]) for one class row: the per-channel scale that row applies (1 = channel kept)."""
        alpha = self.alpha_weight if which == "weight" else self.alpha_bias
        if alpha is None:
            raise ValueError(f"{type(self).__name__} has no {which} gates")
        rows = Rows.prepare(row, self.num_classes)
        if not isinstance(rows.value, int):
            raise TypeError(f"gate() takes one class row (an int), got {row!r}")
        return torch.sigmoid(alpha[rows.value].float())

    def _filter_repr(self):
        return f"num_classes={self.num_classes}, gates={'weight+bias' if self.alpha_bias is not None else 'weight'}"


class WFConv2d(FilteredLayer, nn.Conv2d):
    """A Conv2d whose output channels are gated per sample by its class row (see the module docstring)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", *, num_classes: int, init: float = 3.0, device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device=device, dtype=dtype)
        self._init_filters(num_classes, init, out_channels, bias, device)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_classes: int, init: float = 3.0) -> "WFConv2d":
        """Wrap an existing Conv2d; the new layer shares (and freezes) its weight and bias parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unsupported padding_mode {conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, num_classes=num_classes, init=init,
                    device="meta")
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_filters(num_classes, init, conv.out_channels, conv.bias is not None, conv.weight.device)
        return layer

    def forward(self, x: torch.Tensor, forget=None) -> torch.Tensor:
        rows = self._rows(x, forget)
        if rows is None:
            return nn.Conv2d.forward(self, x)
        self._check_input_device(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        x, weight, bias, cast = _autocast(x, self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            return ops.conv2d_prepared(x, weight, bias, self.alpha_weight, self.alpha_bias, rows, self.stride,
                                       padding, self.dilation, self.groups, backend=None)

    def extra_repr(self):
        return nn.Conv2d.extra_repr(self) + ", " + self._filter_repr()


class WFLinear(FilteredLayer, nn.Linear):
    """A Linear layer whose output features are gated per sample by its class row; input [B, ..., in_features],
    every token of sample n uses row n."""

    def __init__(self, in_features, out_features, bias=True, *, num_classes: int, init: float = 3.0, device=None,
                 dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_filters(num_classes, init, out_features, bias, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_classes: int, init: float = 3.0) -> "WFLinear":
        """Wrap an existing Linear; the new layer shares (and freezes) its weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, num_classes=num_classes,
                    init=init, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_filters(num_classes, init, linear.out_features, linear.bias is not None, linear.weight.device)
        return layer

    def forward(self, x: torch.Tensor, forget=None) -> torch.Tensor:
        rows = self._rows(x, forget)
        if rows is None:
            return nn.Linear.forward(self, x)
        self._check_input_device(x)
        x, weight, bias, cast = _autocast(x, self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            return ops.linear_prepared(x, weight, bias, self.alpha_weight, self.alpha_bias, rows, backend=None)

    def extra_repr(self):
        return nn.Linear.extra_repr(self) + ", " + self._filter_repr()
