"""Wrapping a classifier: ``wrap`` swaps target layers for filtered ones in place, ``WFModel`` routes rows.

Target selection (:func:`find_targets`, docs/method.md section 2; the plan is a :class:`TargetPlan` that says what is
filtered, how, and what is left alone and why):

* ``targets="auto"`` on a model with attention (found by :mod:`wfnet.adapters`: registered attention classes, or
  modules with projection-named child layers): EVERY attention q / k / v projection is filtered (fused qkv, separate
  q / k / v, q + kv, qk + v, class attention, spatial-reduction attention, ``nn.MultiheadAttention``'s
  in-projection), and so is every ``nn.Conv2d`` except the patch embeddings. **decision**: a patch embedding is a
  non-overlapping patchify conv (kernel == stride > 1, no padding, groups 1) outside attention; it stays plain as in
  the paper. A pure transformer (ViT, DeiT, Swin, BEiT, EVA, CaiT) thus gets its projections only; a hybrid
  (LeViT, CoAtNet, MaxViT, EfficientFormer, PVT-v2, XCiT, MobileViT, ...) gets its projections and its convs.
* ``targets="auto"`` on a model without attention: every ``nn.Conv2d`` (plain, strided, dilated, grouped,
  depthwise, squeeze-excitation convs alike).
* ``targets`` may instead be a list of module names / glob patterns (a glob selects only the Conv2d / Linear /
  MultiheadAttention layers it matches), or a predicate ``(name, module)``. An explicitly chosen attention
  projection still gets its adapter's handling (folded windows, functional route, separate biases).
* A model with an attention module that cannot be filtered (an unknown class that owns its projection parameters,
  an unsupported ``nn.MultiheadAttention`` option) is refused at wrap time with the reason
  (:class:`UnsupportedModelError`), whatever ``targets`` says.

Coverage guard (never a silent no-op): every routed forward checks that every filtered layer asked for its rows
(``RouteFrame.used``; one set-size comparison per forward, skipped under ``torch.compile``). A layer that never ran
raises :class:`CoverageError` naming the layers, their parent's class and the likely cause. A known auxiliary head
that runs only in training (torchvision Inception-v3's ``AuxLogits``, GoogLeNet's ``aux1`` / ``aux2``; declared with
:func:`wfnet.adapters.register_training_only`) is filtered and demanded only while its model is in training mode; no
opt-out needed. Opt-out for other models that legitimately skip layers in some modes (undeclared auxiliary heads,
early exits): ``wrap(..., allow_unused=["aux.*"])`` (names or globs of layers that may be skipped) or
``allow_unused=True`` (no check at all). :meth:`WFModel.probe_coverage`
goes further (every filtered layer must receive gate gradient); ``wfnet.untrain`` runs it before training.

All original parameters are frozen; only the gates (``filter_parameters()``) train. BatchNorm layers stay in eval mode
even in ``train()`` (**decision**, docs/method.md section 3: untraining must not shift the running statistics the frozen
weights were trained with); pass ``freeze_norm=False`` to opt out.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from . import adapters, fold as _fold, sets
from .layers import FilteredLayer, WFConv2d, WFLinear, WFMultiheadAttention
from .rows import RowRouter

__all__ = ["WFModel", "wrap", "forgetting", "export", "find_targets", "TargetPlan", "Target", "CoverageError",
           "UnsupportedModelError", "classifier_head"]

Targets = str | Iterable[str] | Callable[[str, nn.Module], bool]
_FILTERABLE = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)


class CoverageError(RuntimeError):
    """A filtered layer did not run (or got no gradient) in a routed forward: its gates would be ignored."""


class UnsupportedModelError(ValueError):
    """The model has attention that wfnet cannot filter; the message gives the reason per module."""


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _is_patchify(conv: nn.Conv2d) -> bool:
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    return (k == s and min(s) > 1 and conv.groups == 1 and conv.padding in ((0, 0), "valid")
            and tuple(conv.dilation) == (1, 1))


def _conv_kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise conv"
    return "grouped conv" if conv.groups > 1 else "conv"


@dataclass
class Target:
    """One layer ``wrap`` filters."""

    name: str
    kind: str              # conv / depthwise conv / grouped conv / qkv / q / kv / ... / in-projection
    layer_type: str        # the original class
    out_features: int      # gated channels / features per class row
    bias_gates: bool       # the layer (or its parent's bias parts) has a bias, gated with alpha_bias
    attention: str = ""    # the attention module it projects for ("" for a conv outside attention)
    family: str = ""       # the adapter's family
    folded: bool = False
    functional: bool = False
    bias_parts: tuple = ()
    training_only: bool = False  # in a declared auxiliary head that runs only in training mode

    def gates_per_class(self) -> int:
        return self.out_features * (2 if self.bias_gates else 1)

    @property
    def label(self) -> str:
        extra = [x for x, on in (("folded windows", self.folded), ("F.linear routed", self.functional),
                                 (f"bias from {'+'.join(self.bias_parts)}", bool(self.bias_parts)),
                                 ("training-only head", self.training_only)) if on]
        return self.kind + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class TargetPlan:
    """What ``wrap`` would do to a model: the layers it filters (:class:`Target`), the layers it leaves alone with the
    reason (``skipped``: name -> reason), and the attention modules it must refuse (``refused``: name -> reason)."""

    model_type: str
    targets: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    attention: int = 0     # attention modules found

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.targets)

    def gate_parameters(self, num_classes: int) -> int:
        return num_classes * sum(t.gates_per_class() for t in self.targets)

    def one_line(self, num_classes: int) -> str:
        """E.g. ``filtering 12 layers of VisionTransformer (12 qkv), 55,296 gate parameters; left alone: 38``."""
        kinds: dict[str, int] = {}
        for t in self.targets:
            kinds[t.label] = kinds.get(t.label, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        line = (f"filtering {len(self.targets)} layers of {self.model_type} ({what}), "
                f"{self.gate_parameters(num_classes):,} gate parameters for {num_classes} classes; "
                f"left alone: {len(self.skipped)}")
        if self.refused:
            line += f"; REFUSED: {len(self.refused)} attention module(s) (see the summary)"
        return line

    def summary(self, num_classes: int) -> str:
        """A readable table: every filtered layer (kind, gated outputs, gate parameters), the total, what is left
        alone grouped by reason, and refusals. What ``wfnet inspect`` prints."""
        rows = [("layer", "kind", "type", "outputs", "gates")]
        for t in self.targets:
            rows.append((t.name, t.label, t.layer_type, str(t.out_features), f"{num_classes * t.gates_per_class():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        fmt = "  ".join(f"{{:{'>' if i >= 3 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [self.one_line(num_classes), "", fmt.format(*rows[0]), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows[1:]]
        lines.append(f"total: {len(self.targets)} layers, {self.gate_parameters(num_classes):,} gate parameters "
                     f"({num_classes} class rows)")
        if self.skipped:
            lines += ["", "left alone:"]
            by_reason: dict[str, list[str]] = {}
            for n, why in self.skipped.items():
                by_reason.setdefault(why, []).append(n)
            for why, names in by_reason.items():
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
                lines.append(f"  {why}: {shown}")
        if self.refused:
            lines += ["", "refused (wrap raises):"]
            lines += [f"  {n}: {why}" for n, why in self.refused.items()]
        return "\n".join(lines)

    def raise_if_refused(self):
        if self.refused:
            detail = "; ".join(f"{n or '<model>'}: {why}" for n, why in self.refused.items())
            raise UnsupportedModelError(f"{self.model_type} cannot be wrapped without ignoring some of its attention "
                                        f"projections: {detail}")


def _select(model: nn.Module, targets, candidates) -> list[str]:
    """Names chosen by explicit targets (a list of names / globs, or a predicate)."""
    if isinstance(targets, str):
        targets = [targets]
    if callable(targets):
        return [n for n, m in candidates if targets(n, m)]
    # An exact name must be a filterable layer (else TypeError in find_targets); a glob pattern ("features.*") picks
    # the filterable layers among the modules it matches, so it can span blocks that also hold ReLUs and norms.
    patterns = list(targets)
    filterable = {n for n, m in candidates if isinstance(m, _FILTERABLE)}

    def matches(n, p):
        return n == p if not _is_glob(p) else (n in filterable and fnmatch.fnmatchcase(n, p))

    names = [n for n, m in candidates if any(matches(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(matches(n, p) for n, _ in candidates)]
    if unmatched:
        hint = (" (glob patterns select only nn.Conv2d / nn.Linear / nn.MultiheadAttention layers)"
                if any(map(_is_glob, unmatched)) else "")
        raise ValueError(f"target pattern(s) {unmatched} match no module of {type(model).__name__}{hint}")
    return names


def find_targets(model: nn.Module, targets: Targets = "auto") -> TargetPlan:
    """The :class:`TargetPlan` of ``wrap(model, ..., targets)``: which layers are filtered and how, what is left alone
    and why, which attention modules are refused (see the module docstring). ``plan.names`` are the layer names;
    ``plan.summary(num_classes)`` renders it. Nothing is modified."""
    modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in modules.items() if n and not isinstance(m, FilteredLayer)]
    sites = adapters.find_attention(model)
    folded_under, sample_free = adapters.find_contexts(model)
    training_only = adapters.find_training_only(model)
    plan = TargetPlan(type(model).__name__, attention=len(sites))
    projection = {}  # layer name -> (role, site)
    for site in sites:
        if site.refused:
            plan.refused[site.name] = site.refused
        for role, leaf in site.projections:
            projection[leaf] = (role, site)
    if targets == "auto":
        if sites:
            names = [n for n, m in candidates if (n in projection and not projection[n][1].refused)
                     or (isinstance(m, nn.Conv2d) and not _is_patchify(m))]
        else:
            names = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    else:
        names = _select(model, targets, candidates)
    free = [n for n in names if adapters.under(n, sample_free) is not None]
    if free and targets != "auto":
        raise ValueError(f"targets {free} run on no sample axis and cannot take class rows: "
                         f"{sample_free[adapters.under(free[0], sample_free)]}")
    names = [n for n in names if n not in free]
    bad = [f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], _FILTERABLE)]
    if bad:
        raise TypeError(f"only nn.Conv2d, nn.Linear and nn.MultiheadAttention layers can be filtered; these targets "
                        f"are not: {bad}")
    chosen = set(names)
    for n in names:
        m = modules[n]
        role, site = projection.get(n, (None, None))
        adapter = site.adapter if site is not None else None
        context = adapters.under(n, folded_under)
        if isinstance(m, nn.MultiheadAttention):
            if site is None or site.refused:  # refused: reported in plan.refused
                continue
            plan.targets.append(Target(n, "in-projection", type(m).__name__, 3 * m.embed_dim,
                                       m.in_proj_bias is not None, n, adapter.family, folded=context is not None))
            continue
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        parts = ()
        if adapter is not None and adapter.functional and adapter.bias_parts and role == n.rsplit(".", 1)[-1]:
            if getattr(site.module, adapter.bias_parts[0], None) is not None and isinstance(m, nn.Linear):
                parts = adapter.bias_parts
        if role is not None:
            kind = role + (" (conv)" if isinstance(m, nn.Conv2d) else "")
        else:
            kind = _conv_kind(m) if isinstance(m, nn.Conv2d) else "linear"
        plan.targets.append(Target(
            n, kind, type(m).__name__, out, m.bias is not None or bool(parts),
            attention=site.name if site is not None else "",
            family=(adapter.family if adapter is not None else "") or (folded_under[context] if context else ""),
            folded=bool(adapter and adapter.folded) or context is not None, functional=bool(adapter and adapter.functional
                                                                      and isinstance(m, nn.Linear)),
            bias_parts=parts, training_only=adapters.under(n, training_only) is not None))
    for n, m in candidates:
        if n in chosen or any(n.startswith(c + ".") for c in chosen):
            continue
        if isinstance(m, _FILTERABLE):
            if adapters.under(n, sample_free) is not None:
                why = sample_free[adapters.under(n, sample_free)]
            elif targets != "auto":
                why = "not selected by targets"
            elif isinstance(m, nn.Conv2d):
                why = "patch embedding (non-overlapping patchify conv), plain as in the paper"
            elif n in projection:
                why = "projection of a refused attention module"
            elif sites:
                why = "Linear outside the q/k/v projections (MLP, output projection, head)"
            else:
                why = "Linear layer of a CNN (MLP / head; only convs are filtered)"
            plan.skipped[n] = why
        elif isinstance(m, nn.modules.conv._ConvNd):
            plan.skipped[n] = f"{type(m).__name__}: only 2-d convolutions can be filtered"
    return plan


class WFModel(nn.Module):
    """A classifier whose filtered layers take a class row per sample. ``wf(x, forget=rows)``; ``forget=None`` runs
    the original model."""

    def __init__(self, model: nn.Module, num_classes: int, layer_names: list[str], freeze_norm: bool = True,
                 allow_unused: bool | Iterable[str] = (), plan: TargetPlan | None = None, fold: bool = True):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.layer_names = list(layer_names)
        self.freeze_norm = freeze_norm
        self.plan = plan
        self.router = RowRouter(num_classes)
        for layer in self.filtered_layers().values():
            layer._router = self.router
        self.set_allow_unused(allow_unused)
        # filtered layer name -> path of the module whose training flag decides whether it runs (declared auxiliary
        # heads, wfnet.adapters.register_training_only); the coverage guard skips them while that module is in eval
        heads = adapters.find_training_only(model)
        self._training_only = {n: heads[p][0] for n in self.layer_names
                               if (p := adapters.under(n, heads)) is not None}
        # forgetting() frames (by id) -> whether the inner model ran on that frame's rows (then the guard checks it)
        self._watched: dict[int, bool] = {}
        model.register_forward_pre_hook(self._note_call)
        # the fold (wfnet.fold): filtered layers applying the eval-mode BatchNorm (+ activation) after them, proven
        # from a torch.fx trace of the real data flow; routed forwards only, checked per call
        self.fold_plan = _fold.plan_fold(model, self.layer_names) if fold else _fold.FoldPlan(error="wrap(fold=False)")
        _fold.install(model, self.router, self.layer_names)

    @property
    def set_composition(self) -> str:
        """How this model's gates compose for a SET of classes (:mod:`wfnet.sets`): the composition they were
        untrained with (``untrain`` sets it; ``save_filters`` stores it and ``load_filters`` restores it), used by
        every routed forward with sets unless a ``wfnet.sets.use_composition`` block says otherwise."""
        return self.router.composition

    @set_composition.setter
    def set_composition(self, name: str) -> None:
        self.router.composition = sets.check_composition(name)

    def set_fold(self, enabled: bool) -> None:
        """Turn the fold (:mod:`wfnet.fold`) on or off for this model's folded chains (outputs agree either way, up
        to float rounding; off = the gate pass, then the BatchNorm and activation modules run as before)."""
        for layer in self.filtered_layers().values():
            if layer._wf_fold is not None:
                layer._wf_fold.enabled = bool(enabled)

    def folded_layers(self) -> dict[str, tuple[str, str]]:
        """Filtered layer name -> (BatchNorm name, activation name or "") of every chain the fold may apply to."""
        return {layer: (norm, act) for layer, norm, act in self.fold_plan.chains}

    def _note_call(self, module, args):
        if self._watched:
            frame = self.router.current()
            if frame is not None and id(frame) in self._watched:
                self._watched[id(frame)] = True

    # ------------------------------------------------------------------------------------------------ coverage
    def set_allow_unused(self, allow_unused: bool | Iterable[str]) -> None:
        """The coverage guard's opt-out: True (no check), or names / glob patterns of filtered layers that may skip
        a routed forward (auxiliary heads, early exits). Every other filtered layer must run in every routed forward.
        A pattern that matches no filtered layer raises."""
        if isinstance(allow_unused, bool):
            self._allow_all, self._allow_unused = allow_unused, frozenset()
            return
        if isinstance(allow_unused, str):
            allow_unused = [allow_unused]
        patterns = list(allow_unused)
        allowed = {n for n in self.layer_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in self.layer_names)]
        if unmatched:
            raise ValueError(f"allow_unused pattern(s) {unmatched} match no filtered layer")
        self._allow_all, self._allow_unused = False, frozenset(allowed)

    def _check_coverage(self, frame) -> None:
        """Raise CoverageError when a filtered layer did not ask for its rows in ``frame`` (a routed forward)."""
        if (self._allow_all or frame.rows is None or len(frame.used) == len(self.layer_names)
                or torch.compiler.is_compiling()):
            return
        layers = self.filtered_layers()
        idle = self._idle_training_only()
        missing = [n for n, layer in layers.items()
                   if id(layer) not in frame.used and n not in self._allow_unused and n not in idle]
        if missing:
            raise CoverageError(self._coverage_message(missing, "never ran during this routed forward"))

    def _idle_training_only(self) -> set[str]:
        """The filtered layers of declared training-only heads whose model is in eval mode now (they do not run)."""
        if not self._training_only:
            return set()
        return {n for n, owner in self._training_only.items()
                if not (self.model.get_submodule(owner) if owner else self.model).training}

    def _coverage_message(self, names, what) -> str:
        parents = {}
        for n in names:
            parent_name = n.rpartition(".")[0]
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            parents.setdefault(f"{type(parent).__module__}.{type(parent).__qualname__}", []).append(n)
        detail = "; ".join(f"{', '.join(ns[:6])}{' ...' if len(ns) > 6 else ''} (parent {cls})"
                           for cls, ns in parents.items())
        return (f"{len(names)} filtered layer(s) of {type(self.model).__name__} {what}, so their gates were "
                f"ignored: {detail}. Likely cause: the parent computes the projection itself from the layer's "
                f"weight (e.g. F.linear(x, self.qkv.weight, ...)) or takes another path in this mode, instead of "
                f"calling the layer. Register an attention adapter (wfnet.adapters.register_adapter), leave these "
                f"layers out with targets=..., or, if the model legitimately skips them in some modes (auxiliary "
                f"heads), wrap with allow_unused=[...]")

    @torch.no_grad()
    def probe_coverage(self, data, device=None, samples: int = 4, rows=None) -> None:
        """Refuse a model whose filtered layers do not all receive gate gradient: one forward + backward on a small
        batch (``data``: an input tensor [B, ...] or a dataset of (x, y) pairs, of which the first ``samples`` are
        used; rows default to the labels, else 0..B-1 mod num_classes) with a fixed random weighting of the outputs.
        Raises CoverageError naming the layers with no (or an all-zero) gradient; changes no parameter or .grad."""
        if isinstance(data, torch.Tensor):
            x = data[:samples]
            labels = None
        else:
            items = [data[i] for i in range(min(samples, len(data)))]
            if not items:
                raise ValueError("probe_coverage needs at least one sample")
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            labels = torch.as_tensor([int(it[1]) for it in items]) if len(items[0]) > 1 else None
        if device is not None:
            x = x.to(device)
        if rows is None:
            rows = labels % self.num_classes if labels is not None else torch.arange(x.shape[0]) % self.num_classes
        self.check_gradient_coverage(x, rows)

    def check_gradient_coverage(self, x: torch.Tensor, rows) -> None:
        """One forward with ``rows`` on ``x`` and a backward to the gate logits: every filtered layer (bar
        ``allow_unused`` and the declared training-only heads of a model in eval mode) must get a non-zero alpha_weight
        gradient, else CoverageError. A tuple output (a training-mode Inception-v3: logits and auxiliary logits) counts
        as a whole: a layer must reach one of its tensors. No side effects."""
        idle = self._idle_training_only()
        layers = {n: m for n, m in self.filtered_layers().items() if self._allow_all is False
                  and n not in self._allow_unused and n not in idle}
        if not layers:
            return
        with torch.enable_grad():
            out = self(x, forget=rows)
            outs = [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (tuple, list)) else [out]
            if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
                raise TypeError(f"check_gradient_coverage needs a tensor output, got {type(out).__name__}")
            outs = [o for o in outs if o.requires_grad]
            if outs:
                g = torch.Generator().manual_seed(0)
                loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device, torch.float32)).sum()
                           for o in outs)
                grads = torch.autograd.grad(loss, [m.alpha_weight for m in layers.values()], allow_unused=True)
            else:  # the output depends on no gate at all
                grads = [None] * len(layers)
        norms = [torch.zeros(()) if gr is None else gr.detach().abs().sum().float().cpu() for gr in grads]
        nonzero = torch.stack(norms).gt(0).tolist()
        dead = [n for n, ok in zip(layers, nonzero) if not ok]
        if dead:
            raise CoverageError(self._coverage_message(dead, "got no gate gradient in a probe step (their output "
                                                             "does not reach the loss)"))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, *args, forget=None, **kwargs):
        """Run the inner model with class row(s) ``forget`` (an int for the whole batch or an int64 tensor [B]).

        ``forget=None`` pushes nothing: outside a :func:`forgetting` context that is the original model; inside one,
        the context's rows apply (so ``with forgetting(wf, c): evaluate(wf)`` filters as it reads). A routed forward
        in which a filtered layer did not run raises :class:`CoverageError` (see the module docstring).
        """
        if forget is None:
            return self.model(*args, **kwargs)
        batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        with self.router.route(forget, batch) as frame:
            out = self.model(*args, **kwargs)
        _fold.check_consumed(frame)
        self._check_coverage(frame)
        return out

    def filtered_layers(self) -> dict[str, FilteredLayer]:
        """Name -> filtered layer, in model order."""
        modules = dict(self.model.named_modules())
        return {n: modules[n] for n in self.layer_names}

    @property
    def kind(self) -> str:
        """"vit" when the model has filtered attention projections, else "cnn" (picks the recipe's lambdas)."""
        if isinstance(self.plan, TargetPlan):
            return "vit" if any(t.attention for t in self.plan.targets) else "cnn"
        return "vit" if any(isinstance(m, (WFLinear, WFMultiheadAttention))
                            for m in self.filtered_layers().values()) else "cnn"

    def summary(self) -> str:
        """The target plan as ``wfnet inspect`` prints it."""
        head = (f"{len(self.layer_names)} filtered layers, {self.num_filter_parameters():,} gate parameters"
                if self.plan is None else self.plan.summary(self.num_classes))
        return head + "\n" + self.fold_plan.summary()

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


def _filtered(old: nn.Module, target: Target, num_classes: int, init: float) -> FilteredLayer:
    if isinstance(old, nn.Conv2d):
        new = WFConv2d.from_conv(old, num_classes, init)
    elif isinstance(old, nn.MultiheadAttention):
        new = WFMultiheadAttention.from_mha(old, num_classes, init)
    else:
        new = WFLinear.from_linear(old, num_classes, init, bias_parts=target.bias_parts)
    if target.folded:
        new.folded_batch = True  # declared by the adapter (instance attribute), never inferred
    new.wf_name = target.name  # for error messages
    return new


def wrap(model: nn.Module, num_classes: int, targets: Targets = "auto", init: float = 3.0,
         freeze_norm: bool = True, allow_unused: bool | Iterable[str] = (), check_head: bool = True,
         fold: bool = True) -> WFModel:
    """Replace the target layers of ``model`` (in place) by filtered layers and return a :class:`WFModel`.

    Every parameter of ``model`` is frozen; the new gates (initialised to ``init``) are the only trainable ones.
    Raises TypeError when ``model`` is not an ``nn.Module`` or ``num_classes`` not an int, ValueError when nothing
    matches or (``check_head``) when the classifier head's output count is known and is not ``num_classes``,
    :class:`UnsupportedModelError` when an attention module cannot be filtered -- all before touching the model.
    ``allow_unused``: the coverage guard's opt-out (see :meth:`WFModel.set_allow_unused`). ``check_head=False``
    keeps ``num_classes`` rows for a head with more outputs (forgetting among the first ``num_classes`` classes of a
    larger label space). ``wrapped.plan`` / ``wrapped.summary()`` tell what was filtered.
    ``fold``: apply each filtered layer's following eval-mode BatchNorm (and activation) in its gate pass in routed
    forwards, where the model's data flow proves the chain (:mod:`wfnet.fold`; ``summary()`` lists the chains).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module (the classifier to filter), got {type(model).__name__}")
    try:  # numpy / torch integers are fine; floats, strings and bools are not
        if isinstance(num_classes, bool):
            raise TypeError
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"num_classes must be an int, got {num_classes!r}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(model, WFModel):
        raise TypeError("model is already wrapped (a WFModel); wrap the original model, or use this WFModel")
    filtered = [n for n, m in model.named_modules() if isinstance(m, FilteredLayer)]
    if filtered:
        raise TypeError(f"{type(model).__name__} is already wrapped: it holds wfnet filtered layers ({filtered[:3]}"
                        f"{' ...' if len(filtered) > 3 else ''}); use the WFModel that wrap() returned, or "
                        f"wfnet.export() for a plain model")
    if check_head:
        head = _head_outputs(model)
        if head is not None and head[1] != num_classes:
            name, outputs = head
            subset = (f", or check_head=False to keep {num_classes} rows for the first {num_classes} of the "
                      f"head's {outputs} classes" if num_classes < outputs else "")
            raise ValueError(f"num_classes={num_classes} but {type(model).__name__}'s classifier head {name} has "
                             f"{outputs} outputs: each class row gates the model for one of its output classes, so "
                             f"they must agree. Pass num_classes={outputs}{subset}")
    plan = find_targets(model, targets)
    plan.raise_if_refused()
    if not plan.targets:
        raise ValueError(f"{type(model).__name__} has no layer to filter (targets={targets!r}): 'auto' looks for "
                         f"attention projections (and then convs), else nn.Conv2d layers")
    for p in model.parameters():
        p.requires_grad_(False)
    routed = {}
    for site in adapters.find_attention(model):
        if site.adapter.prepare is not None:
            site.adapter.prepare(site.module)
        if site.adapter.functional:
            routed[site.name] = site
    for target in plan.targets:
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _filtered(getattr(parent, child), target, num_classes, init))
    for site in routed.values():
        roles = [t.name[len(site.name) + 1:] if site.name else t.name for t in plan.targets
                 if t.functional and t.attention == site.name]
        if roles:
            adapters.install_functional_route(site.module, roles)
    return WFModel(model, num_classes, plan.names, freeze_norm=freeze_norm, allow_unused=allow_unused, plan=plan,
                   fold=fold)


@contextlib.contextmanager
def forgetting(wf: WFModel, rows) -> Iterator[WFModel]:
    """Route ``rows`` to ``wf``'s filtered layers for code that calls the inner model directly. On leaving the block
    (without an exception), the coverage guard checks the forwards of the inner model run inside it, if any."""
    if not isinstance(wf, WFModel):
        raise TypeError(f"forgetting() expects a WFModel (from wfnet.wrap), got {type(wf).__name__}")
    with wf.router.route(rows) as frame:
        wf._watched[id(frame)] = False
        try:
            yield wf
        finally:
            ran = wf._watched.pop(id(frame))
    _fold.check_consumed(frame)
    if ran:
        wf._check_coverage(frame)


# **decision**: the default threshold of a hard export (``hard=True``); measured in docs/threat_model.md.
HARD_EXPORT_THRESHOLD = 0.5


@torch.no_grad()
def export(wf: WFModel, forget, hard: bool | float | None = None) -> nn.Module:
    """A plain copy of the inner model with class ``forget``'s gates baked into the weights (no wfnet layers left).
    ``forget`` may also be one SET of classes (a list of class ids, e.g. ``[3, 7]``): its composed gates
    (:mod:`wfnet.sets`) are baked in, and the hard threshold applies to them.

    Soft export (``hard=None``): its outputs equal ``wf(x, forget=forget)`` up to float rounding (the gate multiplies
    the weights instead of the layer output); a closed channel keeps sigmoid(alpha) of its weights (0.25% at the
    clamp -6). Hard export (``hard=T``, or ``hard=True`` for ``HARD_EXPORT_THRESHOLD``): every output channel whose
    weight gate for ``forget`` is below T is removed, i.e. its weights AND bias are zeroed, so those filters'
    knowledge is not in the exported model at all (docs/threat_model.md).

    A projection whose bias the parent assembles from its own parameters (``bias_parts``, e.g. BEiT's q_bias /
    v_bias) gets those parameters scaled (and zeroed) too. The returned model carries ``wfnet_export``: a dict with
    the row, the threshold and, per filtered layer, ``[removed, total]`` output channels.
    """
    if not isinstance(wf, WFModel):
        raise TypeError(f"export() expects a WFModel, got {type(wf).__name__}")
    if hard is True:
        hard = HARD_EXPORT_THRESHOLD
    elif hard is False:
        hard = None
    if hard is not None and not (isinstance(hard, (int, float)) and 0.0 < float(hard) <= 1.0):
        raise ValueError(f"hard must be a gate threshold in (0, 1] (or True for {HARD_EXPORT_THRESHOLD}), got {hard!r}")
    hard = None if hard is None else float(hard)
    if isinstance(forget, (list, tuple, set, frozenset, range)):
        forget = list(forget)
        sets.sets_to_mask([forget], wf.num_classes)  # raises on a non-int, out-of-range or repeated class
        forget = sorted(forget)
        if not forget:
            raise ValueError("export needs a class or a non-empty set of classes to forget (an empty set is the "
                             "original model)")
    elif isinstance(forget, bool) or not isinstance(forget, int):
        raise TypeError(f"export forget must be a class id or a list of class ids, got {forget!r}")
    model = copy.deepcopy(wf.model)
    _fold.strip(model)  # the exported model is plain: no step-aside BatchNorm / activation classes
    removed_per_layer = {}
    for name in wf.layer_names:
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        _, gb, removed = layer._baked(forget, hard)
        removed_per_layer[name] = [int(removed.sum()), int(removed.numel())]
        setattr(parent, child, layer.to_plain(forget, hard))
        if layer.bias_parts:
            offset = 0
            for part in layer.bias_parts:
                t = getattr(parent, part)
                t.mul_(gb[offset:offset + t.numel()].to(t.dtype))
                offset += t.numel()
    model.wfnet_export = {"forget": forget, "hard": hard, "removed": removed_per_layer,
                          "removed_total": sum(r for r, _ in removed_per_layer.values()),
                          "channels_total": sum(n for _, n in removed_per_layer.values())}
    return model


def _head_outputs(model: nn.Module) -> tuple[str, int] | None:
    """(name, output count) of ``model``'s classifier head where it is known for sure, else None (no check).

    **decision**: only declared heads count -- timm's ``get_classifier()``, else the conventional torchvision / wfnet
    attributes ``fc``, ``classifier``, ``head``, ``heads`` (their last Linear / Conv2d: VGG's ``classifier[-1]``,
    SqueezeNet's 1x1 conv); never "the last Linear of the model", which in a feature extractor is an MLP layer and
    would refuse a valid wrap."""
    def outputs(m):
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, nn.Conv2d):
            return m.out_channels
        return None

    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # a model's own accessor failing is not wrap's business: no check
            return None
        heads = head if isinstance(head, (tuple, list)) else (head,)  # DeiT-distilled: (head, head_dist)
        counts = {outputs(h) for h in heads}
        return ("get_classifier()", counts.pop()) if len(counts) == 1 and None not in counts else None
    for attr in ("fc", "classifier", "head", "heads"):
        m = getattr(model, attr, None)
        if not isinstance(m, nn.Module):
            continue
        name, leaf = attr, m
        if outputs(m) is None:
            layers = [(n, x) for n, x in m.named_modules() if outputs(x) is not None]
            if not layers:
                return None
            sub, leaf = layers[-1]
            name = f"{attr}.{sub}"
        return name, outputs(leaf)
    return None


def classifier_head(model: nn.Module) -> nn.Module:
    """The module whose INPUT is the penultimate representation: timm's ``get_classifier()``, else the last
    ``nn.Linear`` in the model (torchvision's ``fc`` / ``classifier[-1]`` / ``heads.head``)."""
    inner = getattr(model, "model", model)  # a WFModel holds the classifier in .model
    get = getattr(inner, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    last = None
    for m in inner.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(inner).__name__} has no nn.Linear classifier head to take features from")
    return last
