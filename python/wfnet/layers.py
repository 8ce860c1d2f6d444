"""Weight-filtering layers: a frozen conv / linear layer plus a per-class gate matrix per output channel.

``WFConv2d`` and ``WFLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``, so they keep the original ``weight`` / ``bias``
parameters (same names, same state-dict keys, frozen with ``requires_grad=False``) and every option of the original
layer. They add ``alpha_weight`` [num_classes, out] and, when the layer has a bias, ``alpha_bias`` [num_classes, out]:
raw gate logits, initialised to ``init`` (3.0 -> sigmoid 0.95), kept in fp32. Row r scales output channel j by
sigmoid(alpha_weight[r, j]) and its bias by sigmoid(alpha_bias[r, j]) (docs/method.md section 2; **decision**: one gate per
output channel / feature, not per weight element).

``WFMultiheadAttention`` subclasses ``nn.MultiheadAttention`` and gates its in-projection (``in_proj_weight`` /
``in_proj_bias``, [3E, E] / [3E]) the same way: ``alpha_weight`` / ``alpha_bias`` are [num_classes, 3E], one gate per
query / key / value feature (the out-projection stays plain, like timm's ``proj``).

Rows come from the ``forget=`` argument or, inside a wrapped model, from the model's router. No rows means the
original layer, computed by the original ``nn.Conv2d`` / ``nn.Linear`` / ``nn.MultiheadAttention`` forward (bit for
bit). ``to_plain(row)`` gives the plain layer with that row's gates baked into its weights (what ``wfnet.export``
assembles).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, sets
from .rows import LayerRows, RowRouter, Rows

__all__ = ["WFConv2d", "WFLinear", "WFMultiheadAttention", "FilteredLayer"]


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
    # Set by an attention adapter whose parent computes this projection itself with F.linear and a bias it assembles
    # from its own parameters (e.g. timm BEiT: cat(q_bias, k_bias, v_bias)): the names of those parent attributes, in
    # concatenation order. The layer then has alpha_bias for that bias although its own ``bias`` is None; export
    # scales the parent's parts.
    bias_parts: tuple = ()
    wf_name: str = ""  # the layer's name in the wrapped model (set by wrap, for messages)
    # Set by wrap when this layer's output goes only to an eval-mode BatchNorm (and activation): a wfnet.fold.FoldLink.
    # In a routed forward the layer then applies them in its epilogue and they step aside (see wfnet.fold).
    _wf_fold = None

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
            try:
                return self._router.rows_for(self, x, self.folded_batch)
            except ValueError as exc:
                rows = self._router.rows_object()
                if rows is None or rows.batch is None or x.shape[0] == rows.batch:
                    raise
                what = ("its adapter declares a folded batch (k * B, each sample's entries consecutive)"
                        if self.folded_batch else
                        "its input is not [B, ...] and no adapter declares how its leading dimension maps to samples "
                        "(a folded batch must be declared: wfnet.adapters.register_adapter / register_folding; "
                        "wfnet never infers it from sizes)")
                raise ValueError(f"filtered layer {self.wf_name or type(self).__name__}: input leading "
                                 f"size {x.shape[0]} for a batch of {rows.batch} samples, and {what}: {exc}") from exc
        return None

    def _one_sample(self, x, forget, shape: str):
        """The layer on an unbatched input (one sample, which the plain layer accepts: [C, H, W] / [in_features]).
        **decision**: accepted as nn.Conv2d / nn.Linear accept it when the rows are explicit and name one sample (an
        int or 1 row); inside a routed forward the model's rows are bound to a batch axis this input lacks, so it
        raises rather than guess which sample it is."""
        name = self.wf_name or type(self).__name__
        if forget is None:
            raise ValueError(f"filtered layer {name}: an unbatched input {list(x.shape)} ({shape}, no batch axis) in "
                             f"a routed forward: the rows are bound to the model's batch axis, which this input does "
                             f"not have; give the model a batched input [B, {shape[1:-1]}]")
        try:
            Rows.prepare(forget, self.num_classes, 1)
        except ValueError as exc:
            raise ValueError(f"{name} (an unbatched input {list(x.shape)}, {shape}, is one sample: forget names one "
                             f"class row, an int or a single row): {exc}") from exc
        return self.forward(x.unsqueeze(0), forget).squeeze(0)

    def _routed(self) -> bool:
        return self._router is not None and self._router.rows_object() is not None

    def _fold_for(self, forget, out_dims_ok: bool):
        """The link of this call when the fold applies (routed forward, see wfnet.fold.FoldLink.active), else None."""
        link = self._wf_fold
        if link is None or forget is not None or not link.active(self, out_dims_ok):
            return None
        return link

    def _folded(self, link, out):
        """Record ``out`` (computed with ``link``'s affine) so that its BatchNorm / activation step aside for it."""
        if link is not None:
            link.record(self._router.current(), out)
        return out

    def _check_input_device(self, x):
        if x.device != self.weight.device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device} but the layer is on "
                             f"{self.weight.device}; move one of them")

    @torch.no_grad()
    def gate(self, row, which: str = "weight") -> torch.Tensor:
        """sigmoid(alpha[row]) for one class row: the per-channel scale that row applies (1 = channel kept). ``row``
        may also be one SET of classes (a list of class ids, or a bool mask [num_classes]): the composed gates
        (:mod:`wfnet.sets`)."""
        alpha = self.alpha_weight if which == "weight" else self.alpha_bias
        if alpha is None:
            raise ValueError(f"{type(self).__name__} has no {which} gates")
        if sets.is_set_list([row]) or (isinstance(row, torch.Tensor) and row.dtype == torch.bool):
            mask = row.reshape(1, -1) if isinstance(row, torch.Tensor) else sets.sets_to_mask([row], self.num_classes)
            if isinstance(row, torch.Tensor) and row.dim() != 1:
                raise ValueError(f"gate() takes one set (a bool mask [{self.num_classes}]), got a mask of shape "
                                 f"{list(row.shape)}")
            sets.check_mask(mask, self.num_classes, 1)
            how = sets.get_composition(self._router.composition if self._router is not None else None)
            return sets.compose_gates(alpha, mask.to(alpha.device), how)[0].float()
        rows = Rows.prepare(row, self.num_classes)
        if not isinstance(rows.value, int):
            raise TypeError(f"gate() takes one class row (an int), got {row!r}")
        return torch.sigmoid(alpha[rows.value].float())

    def _baked(self, row, hard: float | None = None):
        """(weight gates, bias gates or None, removed-channel mask) of one row (or one set, see :meth:`gate`), in the
        layer's dtype, for export.
        With ``hard``, every output channel whose weight gate is below it is removed: weight AND bias gate 0."""
        gw = self.gate(row)
        removed = gw < hard if hard is not None else torch.zeros_like(gw, dtype=torch.bool)
        gb = self.gate(row, "bias") if self.alpha_bias is not None else None
        gw = gw.masked_fill(removed, 0.0).to(self.weight.dtype)
        if gb is not None:
            gb = gb.masked_fill(removed, 0.0).to(self.weight.dtype)
        return gw, gb, removed

    def _filter_repr(self):
        extra = f", bias_parts={list(self.bias_parts)}" if self.bias_parts else ""
        extra += ", folded_batch=True" if self.folded_batch else ""
        return f"num_classes={self.num_classes}, gates={'weight+bias' if self.alpha_bias is not None else 'weight'}" + extra


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
        """``x``: [B, C, H, W], or one unbatched sample [C, H, W] as nn.Conv2d accepts it (``forget`` then an int or
        one row; see :meth:`FilteredLayer._one_sample`). ``forget``: see the module docstring."""
        if x.dim() != 4 and (forget is not None or self._routed()):
            if x.dim() == 3:
                return self._one_sample(x, forget, "[C, H, W]")
            raise ValueError(f"{self.wf_name or type(self).__name__} expects an input [B, C, H, W] (or one unbatched "
                             f"sample [C, H, W]), got shape {list(x.shape)}")
        rows = self._rows(x, forget)
        if rows is None:
            return nn.Conv2d.forward(self, x)
        self._check_input_device(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        x, weight, bias, cast = _autocast(x, self.weight, self.bias)
        link = self._fold_for(forget, True)
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            return self._folded(link, ops.conv2d_prepared(
                x, weight, bias, self.alpha_weight, self.alpha_bias, rows, self.stride, padding, self.dilation,
                self.groups, backend=None, fold=None if link is None else link.affine()))

    @torch.no_grad()
    def to_plain(self, row: int, hard: float | None = None) -> nn.Conv2d:
        """A plain nn.Conv2d with row ``row``'s gates baked into its weight and bias (``hard``: see ``_baked``)."""
        gw, gb, _ = self._baked(row, hard)
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, self.bias is not None, self.padding_mode,
                          device=self.weight.device, dtype=self.weight.dtype)
        plain.weight.copy_(self.weight * gw.view(-1, 1, 1, 1))
        if self.bias is not None:
            plain.bias.copy_(self.bias * gb)
        return plain.requires_grad_(False)

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
    def from_linear(cls, linear: nn.Linear, num_classes: int, init: float = 3.0,
                    bias_parts: tuple = ()) -> "WFLinear":
        """Wrap an existing Linear; the new layer shares (and freezes) its weight and bias parameters.

        ``bias_parts`` (attention adapters only): the parent supplies this projection's bias at call time, assembled
        from these parent attributes (see :attr:`FilteredLayer.bias_parts`); the layer gets ``alpha_bias`` for it.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if bias_parts and linear.bias is not None:
            raise ValueError("bias_parts is for a projection without its own bias (the parent supplies the bias)")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, num_classes=num_classes,
                    init=init, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_filters(num_classes, init, linear.out_features, linear.bias is not None or bool(bias_parts),
                            linear.weight.device)
        if bias_parts:
            layer.bias_parts = tuple(bias_parts)
        return layer

    def forward(self, x: torch.Tensor, forget=None) -> torch.Tensor:
        """``x``: [B, ..., in_features], or one unbatched sample [in_features] as nn.Linear accepts it (``forget``
        then an int or one row; see :meth:`FilteredLayer._one_sample`)."""
        if x.dim() < 2 and (forget is not None or self._routed()):
            if x.dim() == 1:
                return self._one_sample(x, forget, "[in_features]")
            raise ValueError(f"{self.wf_name or type(self).__name__} expects an input [B, ..., {self.in_features}] "
                             f"(or one unbatched sample [{self.in_features}]), got a 0-d tensor")
        rows = self._rows(x, forget)
        if rows is None:
            return nn.Linear.forward(self, x)
        # a BatchNorm1d after a Linear normalises dim 1: the fold holds for [B, C] outputs only
        return self._gated(x, self.bias, rows, self._fold_for(forget, x.dim() == 2))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, self.weight, bias)`` with this layer's gates, for a parent that computes the projection
        itself with a bias it assembled (the functional route of :mod:`wfnet.adapters`): the bias is gated with
        ``alpha_bias`` like the layer's own. Rows come from the router."""
        rows = self._rows(x, None)
        if rows is None:
            return F.linear(x, self.weight, bias)
        if bias is not None and self.alpha_bias is None:
            raise ValueError(f"{type(self).__name__}: the parent passes a bias of {bias.shape[0]} features but the "
                             f"layer has no bias gates (its adapter declares no bias_parts), so that bias would go "
                             f"unfiltered; register the adapter with bias_parts")
        return self._gated(x, bias, rows)

    def _gated(self, x, bias, rows, link=None):
        self._check_input_device(x)
        x, weight, bias, cast = _autocast(x, self.weight, bias)
        alpha_bias = self.alpha_bias if bias is not None else None
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            return self._folded(link, ops.linear_prepared(x, weight, bias, self.alpha_weight, alpha_bias, rows,
                                                          backend=None,
                                                          fold=None if link is None else link.affine()))

    @torch.no_grad()
    def to_plain(self, row: int, hard: float | None = None) -> nn.Linear:
        """A plain nn.Linear with row ``row``'s gates baked into its weight and bias (a parent's ``bias_parts`` are
        baked by ``wfnet.export``, which owns the parent; ``hard``: see ``_baked``)."""
        gw, gb, _ = self._baked(row, hard)
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                          dtype=self.weight.dtype)
        plain.weight.copy_(self.weight * gw.view(-1, 1))
        if self.bias is not None:
            plain.bias.copy_(self.bias * gb)
        return plain.requires_grad_(False)

    def extra_repr(self):
        return nn.Linear.extra_repr(self) + ", " + self._filter_repr()


def _as_additive_mask(mask, dtype, name):
    """A bool mask (True = not allowed, as nn.MultiheadAttention reads it) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class WFMultiheadAttention(FilteredLayer, nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose in-projection (queries, keys, values: 3E features) is gated per sample by
    its class row, in both ``batch_first`` layouts. Same parameters (shared, frozen) and state-dict keys.

    With rows, the attention is computed here (in-projection through :func:`wfnet.ops.linear_prepared`, then
    ``scaled_dot_product_attention``, or an explicit softmax when the weights are requested); without rows, the
    original ``nn.MultiheadAttention.forward`` runs. A sequence-first input [L, B, E] is transposed to batch-first
    before the projection, so a sample's rows are never read off the sequence axis. Supported: self- and
    cross-attention with ``kdim == vdim == embed_dim``, ``attn_mask`` (2-d / 3-d, bool or float),
    ``key_padding_mask``, ``is_causal``, ``need_weights`` / ``average_attn_weights``, dropout. Refused at wrap time
    (:meth:`unsupported`): ``add_bias_kv``, ``add_zero_attn``, separate ``kdim`` / ``vdim`` projections.
    """

    @property
    def weight(self):
        return self.in_proj_weight

    @property
    def bias(self):
        return self.in_proj_bias

    @staticmethod
    def unsupported(mha: nn.MultiheadAttention) -> str | None:
        """Why ``mha`` cannot be filtered (None when it can)."""
        reasons = []
        if not mha._qkv_same_embed_dim:
            reasons.append("kdim/vdim differ from embed_dim (separate q/k/v projection weights)")
        if mha.bias_k is not None:
            reasons.append("add_bias_kv=True")
        if mha.add_zero_attn:
            reasons.append("add_zero_attn=True")
        return ", ".join(reasons) or None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, num_classes: int, init: float = 3.0) -> "WFMultiheadAttention":
        """Wrap an existing nn.MultiheadAttention; shares (and freezes) its parameters and its out_proj module."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        why = cls.unsupported(mha)
        if why:
            raise ValueError(f"nn.MultiheadAttention with {why} cannot be filtered")
        layer = cls.__new__(cls)
        nn.MultiheadAttention.__init__(layer, mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                                       batch_first=mha.batch_first, device="meta")
        layer.in_proj_weight = mha.in_proj_weight
        layer.in_proj_bias = mha.in_proj_bias
        layer.out_proj = mha.out_proj
        layer.training = mha.training
        layer._init_filters(num_classes, init, 3 * mha.embed_dim, mha.in_proj_bias is not None,
                            mha.in_proj_weight.device)
        for p in layer.out_proj.parameters():
            p.requires_grad_(False)
        return layer

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        routed = self._router is not None and self._router.rows_object() is not None
        if not routed or query.dim() != 3:
            if routed:
                raise ValueError(f"{type(self).__name__}: an unbatched input (shape {list(query.shape)}) has no "
                                 f"sample axis to take class rows from")
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask=key_padding_mask,
                                                 need_weights=need_weights, attn_mask=attn_mask,
                                                 average_attn_weights=average_attn_weights, is_causal=is_causal)
        self_attn = query is key and key is value
        if not self.batch_first:  # [L, B, E] -> [B, L, E]: rows follow the batch axis, never the sequence axis
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        rows = self._rows(query, None)
        self._check_input_device(query)
        e = self.embed_dim
        x, weight, bias, cast = _autocast(query, self.in_proj_weight, self.in_proj_bias)
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            if self_attn:
                q, k, v = ops.linear_prepared(x, weight, bias, self.alpha_weight, self.alpha_bias, rows).chunk(3, -1)
            else:
                ins = (x, key.to(x.dtype), value.to(x.dtype))
                q, k, v = (ops.linear_prepared(
                    t, weight[i * e:(i + 1) * e], None if bias is None else bias[i * e:(i + 1) * e],
                    self.alpha_weight[:, i * e:(i + 1) * e].contiguous(),
                    None if bias is None else self.alpha_bias[:, i * e:(i + 1) * e].contiguous(), rows)
                    for i, t in enumerate(ins))
        b, lq, _ = q.shape
        s, h = k.shape[1], self.num_heads
        q, k, v = (t.reshape(b, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, is_causal, b, lq, s, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(scores.softmax(-1), p=p)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, lq, e)
        out = F.linear(out, self.out_proj.weight.to(out.dtype),
                       None if self.out_proj.bias is None else self.out_proj.bias.to(out.dtype))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, b, lq, s, dtype, device):
        """attn_mask ([L, S] or [B*heads, L, S]) and key_padding_mask ([B, S]) as one additive [B|1, heads|1, L, S]
        mask (True = not allowed, as in nn.MultiheadAttention); is_causal builds the causal mask when none is given."""
        h = self.num_heads
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, s, dtype=torch.bool, device=device).triu(1)
        mask = _as_additive_mask(attn_mask, dtype, "attn_mask")
        if mask is not None:
            mask = mask.view(1, 1, lq, s) if mask.dim() == 2 else mask.view(b, h, lq, s)
        pad = _as_additive_mask(key_padding_mask, dtype, "key_padding_mask")
        if pad is not None:
            pad = pad.view(b, 1, 1, s)
            mask = pad if mask is None else mask + pad
        return mask

    @torch.no_grad()
    def to_plain(self, row: int, hard: float | None = None) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with row ``row``'s gates baked into its in-projection (``hard``: see
        ``_baked``)."""
        gw, gb, _ = self._baked(row, hard)
        plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
                                      batch_first=self.batch_first, device=self.in_proj_weight.device,
                                      dtype=self.in_proj_weight.dtype)
        plain.in_proj_weight.copy_(self.in_proj_weight * gw.view(-1, 1))
        if self.in_proj_bias is not None:
            plain.in_proj_bias.copy_(self.in_proj_bias * gb)
        plain.out_proj.load_state_dict(self.out_proj.state_dict())
        plain.train(self.training)
        return plain.requires_grad_(False)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                + self._filter_repr())
