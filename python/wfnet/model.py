"""Wrapping a classifier: ``wrap`` swaps target layers for filtered ones in place, ``WFModel`` routes rows.

Target selection ("auto", method.md section 2): if the model has attention blocks with a ``qkv`` Linear (timm ViTs,
DeiT, Swin, ...), every such qkv projection is filtered and nothing else (the patch embedding conv stays plain, as in
the paper); otherwise every ``nn.Conv2d`` is filtered (plain, strided, dilated, grouped, depthwise, squeeze-excitation
convs alike). ``targets`` may instead be a list of module names / glob patterns (a glob selects only the Conv2d /
Linear layers it matches), or a predicate ``(name, module)``.

All original parameters are frozen; only the gates (``filter_parameters()``) train. BatchNorm layers stay in eval mode
even in ``train()`` (**decision**, method.md section 3: untraining must not shift the running statistics the frozen
weights were trained with); pass ``freeze_norm=False`` to opt out.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from .layers import FilteredLayer, WFConv2d, WFLinear
from .rows import RowRouter

__all__ = ["WFModel", "wrap", "forgetting", "export", "find_targets"]

Targets = str | Iterable[str] | Callable[[str, nn.Module], bool]


def _is_attention_qkv(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    return name.rsplit(".", 1)[-1] == "qkv" and isinstance(module, nn.Linear) and parent is not None


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def find_targets(model: nn.Module, targets: Targets = "auto") -> list[str]:
    """Names of the modules ``wrap`` would filter (see the module docstring for the rules)."""
    modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in modules.items() if n and not isinstance(m, FilteredLayer)]
    if targets == "auto":
        qkv = [n for n, m in candidates
               if _is_attention_qkv(n, m, modules.get(n.rsplit(".", 1)[0] if "." in n else ""))]
        if qkv:
            return qkv
        return [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    if isinstance(targets, str):
        targets = [targets]
    if callable(targets):
        names = [n for n, m in candidates if targets(n, m)]
    else:
        # An exact name must be a filterable layer (else TypeError below); a glob pattern ("features.*") picks the
        # Conv2d / Linear layers among the modules it matches, so it can span blocks that also hold ReLUs and norms.
        patterns = list(targets)
        filterable = {n for n, m in candidates if isinstance(m, (nn.Conv2d, nn.Linear))}

        def matches(n, p):
            return n == p if not _is_glob(p) else (n in filterable and fnmatch.fnmatchcase(n, p))

        names = [n for n, m in candidates if any(matches(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(matches(n, p) for n, _ in candidates)]
        if unmatched:
            hint = " (glob patterns select only nn.Conv2d / nn.Linear layers)" if any(map(_is_glob, unmatched)) else ""
            raise ValueError(f"target pattern(s) {unmatched} match no module of {type(model).__name__}{hint}")
    bad = [f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], (nn.Conv2d, nn.Linear))]
    if bad:
        raise TypeError(f"only nn.Conv2d and nn.Linear layers can be filtered; these targets are not: {bad}")
    return names


class WFModel(nn.Module):
    """A classifier whose filtered layers take a class row per sample. ``wf(x, forget=rows)``; ``forget=None`` runs
    the original model."""

    def __init__(self, model: nn.Module, num_classes: int, layer_names: list[str], freeze_norm: bool = True):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.layer_names = list(layer_names)
        self.freeze_norm = freeze_norm
        self.router = RowRouter(num_classes)
        for layer in self.filtered_layers().values():
            layer._router = self.router

    def forward(self, *args, forget=None, **kwargs):
        """Run the inner model with class row(s) ``forget`` (an int for the whole batch or an int64 tensor [B]).

        ``forget=None`` pushes nothing: outside a :func:`forgetting` context that is the original model; inside one,
        the context's rows apply (so ``with forgetting(wf, c): evaluate(wf)`` filters as it reads).
        """
        if forget is None:
            return self.model(*args, **kwargs)
        batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        with self.router.route(forget, batch):
            return self.model(*args, **kwargs)

    def filtered_layers(self) -> dict[str, FilteredLayer]:
        """Name -> filtered layer, in model order."""
        modules = dict(self.model.named_modules())
        return {n: modules[n] for n in self.layer_names}

    def filter_parameters(self) -> Iterator[nn.Parameter]:
        """The gate logits only (alpha_weight, alpha_bias of every filtered layer), ready for an optimizer."""
        for layer in self.filtered_layers().values():
            yield layer.alpha_weight
            if layer.alpha_bias is not None:
                yield layer.alpha_bias

    def named_filter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.filtered_layers().items():
            yield f"{name}.alpha_weight", layer.alpha_weight
            if layer.alpha_bias is not None:
                yield f"{name}.alpha_bias", layer.alpha_bias

    def num_filter_parameters(self) -> int:
        return sum(p.numel() for p in self.filter_parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_norm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self

    def extra_repr(self):
        return f"num_classes={self.num_classes}, filtered_layers={len(self.layer_names)}"


def wrap(model: nn.Module, num_classes: int, targets: Targets = "auto", init: float = 3.0,
         freeze_norm: bool = True) -> WFModel:
    """Replace the target layers of ``model`` (in place) by filtered layers and return a :class:`WFModel`.

    Every parameter of ``model`` is frozen; the new gates (initialised to ``init``) are the only trainable ones.
    Raises ValueError when nothing matches.
    """
    if isinstance(model, WFModel):
        raise TypeError("model is already wrapped")
    names = find_targets(model, targets)
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer to filter (targets={targets!r}): 'auto' looks for "
                         f"attention qkv Linear layers, else nn.Conv2d layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = (WFConv2d.from_conv(old, num_classes, init) if isinstance(old, nn.Conv2d)
               else WFLinear.from_linear(old, num_classes, init))
        setattr(parent, child, new)
    return WFModel(model, num_classes, names, freeze_norm=freeze_norm)


@contextlib.contextmanager
def forgetting(wf: WFModel, rows) -> Iterator[WFModel]:
    """Route ``rows`` to ``wf``'s filtered layers for code that calls the inner model directly."""
    if not isinstance(wf, WFModel):
        raise TypeError(f"forgetting() expects a WFModel (from wfnet.wrap), got {type(wf).__name__}")
    with wf.router.route(rows):
        yield wf


@torch.no_grad()
def export(wf: WFModel, forget: int) -> nn.Module:
    """A plain copy of the inner model with class ``forget``'s gates baked into the weights (no wfnet layers left).

    Its outputs equal ``wf(x, forget=forget)`` up to float rounding (the gate multiplies the weights instead of the
    conv output).
    """
    if not isinstance(wf, WFModel):
        raise TypeError(f"export() expects a WFModel, got {type(wf).__name__}")
    model = copy.deepcopy(wf.model)
    for name in wf.layer_names:
        layer = model.get_submodule(name)
        g = layer.gate(forget).to(layer.weight.dtype)
        if isinstance(layer, WFConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                              device=layer.weight.device, dtype=layer.weight.dtype)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight.copy_(layer.weight * g.view((-1,) + (1,) * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            gb = layer.gate(forget, "bias").to(layer.bias.dtype) if layer.alpha_bias is not None else 1
            plain.bias.copy_(layer.bias * gb)
        plain.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
