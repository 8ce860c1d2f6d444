"""The fold: a filtered layer's gate, the eval-mode BatchNorm after it and an elementwise activation, in ONE pass.

A per-output-channel gate is a per-sample affine, ``y = g[n, c] * z + gb[n, c]``; an eval-mode BatchNorm is a
per-channel affine, ``s * y + t`` with ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - s * running_mean``.
So conv -> gate -> BatchNorm -> activation is

    act((s * g) * z + (s * gb + t))

one per-sample affine (the gates ``g' = s * g``, ``gb' = s * gb + t``, fp32 [B, C], computed once per layer call
AFTER the per-sample gates; differentiable, so gate gradients are those of the unfolded chain) plus a pointwise
function, applied by the backend's epilogue (``torch``: in place on the conv output without a graph, in cache-sized
blocks with a hand-written backward with one: ``wfnet.backends.torch_ref.gate_epilogue``; ``triton``: inside the
GEMM / conv epilogue or its one fused pass; ``cuda``: the compiled epilogue takes ``s``, ``t`` and the
activation). The BatchNorm and the activation module then step aside for that call (they return their input).

**decision**: detection at wrap time from the model's real data flow, enforcement at run time.

* Detection (:func:`plan_fold`): a ``torch.fx`` symbolic trace of the wrapped model, with the filtered layers,
  BatchNorms and activation modules as leaves. A filtered ``Conv2d`` (``Linear``) node is folded when its output has
  exactly ONE user, a ``BatchNorm2d`` (``BatchNorm1d``) module of the same channel count called on it alone, that
  module is called once in the whole graph, and the layer too. The activation is folded too when the BatchNorm's
  output has exactly one user, an activation module (exact types: ``ReLU``, ``ReLU6``, ``SiLU``, ``GELU`` with
  ``approximate="none"``, ``Hardswish``, ``Hardsigmoid``) called on it alone; an activation module used several times
  (torchvision's ``BasicBlock.relu``) is folded only for the call on that BatchNorm's output. timm's
  ``BatchNormAct2d`` (BatchNorm + drop + act in one module) is folded as a BatchNorm, with its act when its drop is an
  ``Identity`` and its act one of the types above. Names are never used. Anything else -- a model that fx cannot
  trace, a conv output read twice (a residual branch), a BatchNorm subclass with its own forward, a BatchNorm
  without running statistics -- stays unfolded and computes exactly as before; ``WFModel.summary()`` lists what is
  folded and why the rest is not.
* Run time (every call, :meth:`FoldLink.active`): the fold applies only in a ROUTED forward (``wf(x, forget=...)``
  or inside ``wfnet.forgetting``); ``forget=None`` never touches it, so it is the original model bit for bit, and a
  layer called with an explicit ``forget=`` returns its own output. It is **disabled for a chain** while its
  BatchNorm is in training mode (the batch statistics are not an affine known in advance), while any forward /
  backward hook or pre-hook is registered on the filtered layer, the BatchNorm or the activation (the hook would see
  the folded tensor), while a global module hook is registered, and for a linear layer whose output is not [B, C].
  ``WFModel.set_fold(False)`` / ``wrap(..., fold=False)`` turns it off for the model.
* Step-aside protocol: the folded layer records its output tensor in the routed forward's frame
  (``RouteFrame.fold``); the BatchNorm (and then the activation) return their input unchanged only when called with
  THAT tensor object, and consume the record. A record left at the end of the routed forward (the folded output did
  not reach its BatchNorm) raises :class:`FoldError` -- never a silent double normalisation.
* The BatchNorm and activation modules keep their parameters, buffers and state-dict keys (the fold is not a weight
  edit); their class is swapped for a subclass of their own class that adds the step-aside check (as
  ``torch.nn.utils.parametrize`` does), so ``isinstance`` holds, ``save`` / ``load_filters`` / state dicts are
  unchanged, ``copy.deepcopy`` and pickling keep it, and :func:`wfnet.export` strips it (``strip``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Affine", "FoldError", "FoldLink", "FoldPlan", "ACTIVATIONS", "activate", "plan_fold", "install",
           "strip", "activation_name"]

# exact activation module types that may be folded -> the epilogue's activation name
ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish",
               nn.Hardsigmoid: "hardsigmoid"}
ACT_NAMES = ("none", "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid")


class FoldError(RuntimeError):
    """A folded layer's output did not reach the BatchNorm (or activation) it was folded with in a routed forward."""


def activation_name(m: nn.Module) -> str | None:
    """The epilogue name of activation module ``m`` when it can be folded (exact type, elementwise), else None."""
    name = ACTIVATIONS.get(type(m))
    if name == "gelu" and getattr(m, "approximate", "none") != "none":
        return None
    return name


def activate(y: torch.Tensor, act: str, in_place: bool) -> torch.Tensor:
    """``act`` applied to ``y`` (the torch statement of the epilogue's activations). ``in_place``: ``y`` is a fresh
    tensor owned by the caller (overwritten where autograd allows it)."""
    if act == "none":
        return y
    if act == "relu":
        # relu's backward reads its output, never its input: in place on a fresh y even under autograd
        return torch.relu_(y) if in_place else torch.relu(y)
    fn = {"relu6": F.relu6, "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish,
          "hardsigmoid": F.hardsigmoid}.get(act)
    if fn is None:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACT_NAMES)}")
    if act == "gelu":
        return fn(y)  # no in-place variant
    return fn(y, inplace=in_place and not _needs_graph(y))


# their derivatives, as PyTorch's autograd computes them (the torch backend's hand-written backward uses these):
# from the OUTPUT where PyTorch does so too (relu, relu6: the pre-activation need not be kept), else from the input
ACT_GRAD_FROM_OUTPUT = {"relu": lambda dy, y: torch.ops.aten.threshold_backward(dy, y, 0),
                        "relu6": lambda dy, y: torch.ops.aten.hardtanh_backward(dy, y, 0.0, 6.0)}
ACT_GRAD_FROM_INPUT = {"silu": torch.ops.aten.silu_backward,
                       "gelu": lambda dy, x: torch.ops.aten.gelu_backward(dy, x, approximate="none"),
                       "hardswish": torch.ops.aten.hardswish_backward,
                       "hardsigmoid": torch.ops.aten.hardsigmoid_backward}


def _needs_graph(y):
    return torch.is_grad_enabled() and y.requires_grad


class Affine(NamedTuple):
    """A folded BatchNorm (+ activation): ``act(scale * y + shift)`` per channel; scale / shift fp32 [C]."""

    scale: torch.Tensor
    shift: torch.Tensor
    act: str = "none"

    def gates(self, g: torch.Tensor, gb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded per-sample gates (fp32 [B, C]): ``g' = s * g``, ``gb' = s * gb + t`` (``t`` alone without
        bias)."""
        g2 = g.float() * self.scale
        shift = self.shift.unsqueeze(0).expand_as(g2)
        return g2, shift if gb is None else torch.addcmul(shift, gb.float(), self.scale)

    @staticmethod
    def of(norm: nn.Module, act: str = "none") -> "Affine":
        """The eval-mode affine of a BatchNorm module, fp32, differentiable in its weight / bias."""
        s = torch.rsqrt(norm.running_var.float() + norm.eps)
        if norm.weight is not None:
            s = s * norm.weight.float()
        mean = norm.running_mean.float()
        t = -mean * s if norm.bias is None else torch.addcmul(norm.bias.float(), mean, s, value=-1)
        return Affine(s, t, act)


# ------------------------------------------------------------------------------------------------- step-aside
class _StepAside:
    """Mixin put in front of a folded BatchNorm's / activation's own class: returns the input unchanged when it is
    the tensor recorded for this module in the current routed forward (see the module docstring)."""

    _wf_base: type = nn.Module

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            hit = _take(self, args[0])
            if hit is not None:
                return hit
        return super().forward(*args, **kwargs)

    def _get_name(self):  # repr shows the module's own class name
        return self._wf_base.__name__

    def __reduce_ex__(self, protocol):  # deepcopy / pickle: the same subclass rebuilt from the base class
        return _rebuild, (self._wf_base,), self.__getstate__()


_STEP_CLASSES: dict = {}


def _step_class(base: type) -> type:
    cls = _STEP_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_StepAside, base), {"_wf_base": base, "__module__": __name__,
                                                      "__qualname__": f"_StepAside[{base.__qualname__}]"})
        _STEP_CLASSES[base] = cls
    return cls


def _rebuild(base: type):
    return object.__new__(_step_class(base))


def _take(module, x):
    """If ``x`` is the tensor recorded for ``module`` in this thread's routed forward: consume the record (passing it
    on to the next module of the chain) and return what the module returns when folded; else None."""
    router = module.__dict__.get("_wf_router")
    if router is None:
        return None
    frame = router.current()
    if frame is None or not frame.fold:
        return None
    pending = frame.fold
    for i in range(len(pending)):
        m, t, nxt, result = pending[i]
        if m is module and t is x:
            pending.pop(i)
            if nxt is not None:
                pending.append((nxt, x, None, None))
            return x if result is None else result(module, x)
    return None


def _bnact_unfolded_act(module, x):
    """timm BatchNormAct2d folded without its activation: the BatchNorm is done, its drop and act still run."""
    return module.act(module.drop(x))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    mod = nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks
                or mod._global_backward_pre_hooks)


@dataclass(eq=False)
class FoldLink:
    """What a filtered layer is folded with (held by the layer as ``_wf_fold``; a plain object, so the modules it
    names are not registered as submodules and the state dict is unchanged)."""

    norm: nn.Module
    act: nn.Module | None           # a separate activation module that steps aside, else None
    act_name: str                   # the epilogue activation ("none" when no activation is folded)
    inner_act: nn.Module | None     # timm BatchNormAct2d: its own act module when folded
    names: tuple                    # (layer, norm, activation or "") names, for summaries and messages
    enabled: bool = True

    def active(self, layer: nn.Module, out_dims_ok: bool) -> bool:
        """Whether the fold applies to this call (see "Run time" in the module docstring)."""
        norm = self.norm
        if not (self.enabled and out_dims_ok and isinstance(norm, _StepAside)) or norm.training:
            return False
        if norm.running_mean is None or norm.running_var is None:
            return False
        if self.act is not None and not isinstance(self.act, _StepAside):
            return False
        if _has_hooks(layer) or _has_hooks(norm) or (self.act is not None and _has_hooks(self.act)):
            return False
        if self.inner_act is not None and _has_hooks(self.inner_act):
            return False
        return not _global_hooks()

    def affine(self) -> Affine:
        """The BatchNorm's affine, recomputed per call (4 tiny ops on [C]): **decision**: no cache, since running
        statistics can change without a version-counter bump (the CPU batch-norm kernel and ``.data`` writes update
        them in place unseen), and a stale affine would be silently wrong."""
        return Affine.of(self.norm, self.act_name)

    def record(self, frame, out: torch.Tensor) -> None:
        """The layer produced ``out`` folded: its BatchNorm (then activation) will step aside for it."""
        result = None
        if _is_bnact(self.norm) and self.inner_act is None:
            result = _bnact_unfolded_act
        frame.fold.append((self.norm, out, self.act, result))


def _is_bnact(m) -> bool:
    """timm's BatchNormAct2d (matched by class, never by a module name)."""
    timm_layers = sys.modules.get("timm.layers")
    cls = getattr(timm_layers, "BatchNormAct2d", None) if timm_layers is not None else None
    return cls is not None and isinstance(m, cls)


# ------------------------------------------------------------------------------------------------- detection
@dataclass
class FoldPlan:
    """What :func:`plan_fold` found: folded chains (layer, norm, activation or "") and, for the filtered layers that
    stay unfolded, why."""

    chains: list = field(default_factory=list)
    unfolded: dict = field(default_factory=dict)
    error: str | None = None  # the model could not be traced: nothing folded

    def summary(self) -> str:
        if self.error:
            return f"fold: none ({self.error})"
        total = len(self.chains) + len(self.unfolded)
        acts = sum(1 for c in self.chains if c[2])
        lines = [f"fold: {len(self.chains)} of {total} filtered layers folded with the BatchNorm after them "
                 f"({acts} with their activation too; eval-mode BatchNorm, routed forwards only)"]
        for layer, norm, act in self.chains:
            lines.append(f"  folded  {layer} -> {norm}" + (f" -> {act}" if act else ""))
        for layer, why in self.unfolded.items():
            lines.append(f"  plain   {layer}: {why}")
        return "\n".join(lines)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        from .layers import FilteredLayer
        if isinstance(m, (FilteredLayer, nn.modules.batchnorm._BatchNorm)) or type(m) in ACTIVATIONS:
            return True
        return super().is_leaf_module(m, qualname)


def _norm_ok(norm, layer) -> str | None:
    """Why BatchNorm ``norm`` cannot be folded after ``layer`` (None when it can)."""
    from .layers import WFConv2d
    conv = isinstance(layer, WFConv2d)
    want = nn.BatchNorm2d if conv else nn.BatchNorm1d
    if not (type(norm) is want or (conv and _is_bnact(norm))):
        return (f"followed by {type(norm).__name__}, not a {want.__name__}" +
                (" / timm BatchNormAct2d" if conv else ""))
    if not norm.track_running_stats or norm.running_mean is None:
        return f"{type(norm).__name__} keeps no running statistics (it always normalises with batch statistics)"
    if norm.num_features != layer.weight.shape[0]:
        return f"{type(norm).__name__} has {norm.num_features} channels, the layer {layer.weight.shape[0]}"
    return None


def plan_fold(model: nn.Module, layer_names) -> FoldPlan:
    """Find the foldable chains of the wrapped ``model`` (its filtered layers ``layer_names``) from a torch.fx trace
    (see the module docstring). Never raises for a model it cannot trace: the plan then folds nothing and says why."""
    from .layers import WFConv2d, WFLinear
    plan = FoldPlan()
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in layer_names}
    candidates = {n for n, m in layers.items()
                  if type(m) in (WFConv2d, WFLinear) and not m.folded_batch and not m.bias_parts}
    for n in layers:
        if n not in candidates:
            plan.unfolded[n] = "not a plain filtered Conv2d / Linear (attention projection or folded batch)"
    if not candidates:
        return plan
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
        for n in candidates:
            plan.unfolded[n] = "the model has no BatchNorm"
        return plan
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any model fx cannot trace: unfolded, correct, and said
        plan.error = f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {str(exc)[:160]}"
        for n in candidates:
            plan.unfolded[n] = "not traceable"
        return plan
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name in layer_names:
        if name not in candidates:
            continue
        layer = layers[name]
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            plan.unfolded[name] = f"called {len(nodes)} times in one forward"
            continue
        node = nodes[0]
        users = list(node.users)
        if len(users) != 1:
            plan.unfolded[name] = f"its output is read by {len(users)} operations (not only a BatchNorm)"
            continue
        user = users[0]
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            plan.unfolded[name] = f"its output goes to {user.op} {getattr(user.target, '__name__', user.target)}"
            continue
        norm = modules[user.target]
        why = _norm_ok(norm, layer)
        if why is None and len(calls[user.target]) != 1:
            why = f"{user.target} is called {len(calls[user.target])} times in one forward"
        if why is not None:
            plan.unfolded[name] = why
            continue
        act_mod, act_name, inner, act_path = None, "none", None, ""
        if _is_bnact(norm):
            a = activation_name(norm.act) if type(norm.drop) is nn.Identity else None
            if a is not None:
                act_name, inner, act_path = a, norm.act, f"{user.target}.act"
        else:
            nusers = list(user.users)
            if len(nusers) == 1 and nusers[0].op == "call_module" and nusers[0].args == (user,) \
                    and not nusers[0].kwargs:
                a = activation_name(modules[nusers[0].target])
                if a is not None:
                    act_mod, act_name, act_path = modules[nusers[0].target], a, nusers[0].target
        plan.chains.append((name, user.target, act_path))
        layer._wf_fold_pending = FoldLink(norm, act_mod, act_name, inner, (name, user.target, act_path))
    return plan


def install(model: nn.Module, router, layer_names) -> None:
    """Activate the planned links of ``model``'s filtered layers: swap the BatchNorm / activation classes for their
    step-aside subclasses and point them at the model's router."""
    modules = dict(model.named_modules())
    for name in layer_names:
        layer = modules[name]
        link = layer.__dict__.pop("_wf_fold_pending", None)
        if link is None:
            continue
        for m in (link.norm, link.act):
            if m is None:
                continue
            if not isinstance(m, _StepAside):
                m.__class__ = _step_class(type(m))
            m._wf_router = router
        layer._wf_fold = link


def strip(model: nn.Module) -> None:
    """Undo :func:`install` on ``model`` (what :func:`wfnet.export` hands out is a plain model)."""
    for m in model.modules():
        if isinstance(m, _StepAside):
            m.__class__ = m._wf_base
            m.__dict__.pop("_wf_router", None)
        m.__dict__.pop("_wf_fold", None)


def check_consumed(frame) -> None:
    """Raise :class:`FoldError` when a folded output did not reach its BatchNorm / activation in ``frame``."""
    if frame is not None and frame.fold:
        left = [type(m).__name__ for m, *_ in frame.fold]
        frame.fold.clear()
        raise FoldError(f"a folded layer's output never reached the module it was folded with ({', '.join(left)}): "
                        f"the model's data flow differs from the one traced at wrap time, so that output is already "
                        f"normalised and must not be used otherwise. Wrap with fold=False (or wf.set_fold(False)).")
