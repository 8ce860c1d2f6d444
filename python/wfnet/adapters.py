"""Attention adapters: how each attention family computes its q / k / v projections, so that ``wrap`` filters them.

The method filters "the projection that produces queries, keys and values" (docs/method.md section 2). Attention
implementations compute it in different ways, and a filtered layer that the attention never calls would leave its
gates silently ignored. So attention is handled through a small registry keyed by the attention module's class
(peft-style per-layer-type dispatch: the first class of ``type(module).__mro__`` that is registered wins), with one
:class:`AttentionAdapter` per family saying:

* ``projections``: the children (dotted paths) that hold the projection layers, in order (absent / None skipped).
  Each is an ``nn.Linear`` / ``nn.Conv2d`` or a small module that contains them (LeViT's ``LinearNorm``: the Linear
  inside is filtered). **decision**: separate projections (q / k / v, q + kv, qk + v, class-attention,
  spatial-reduction attention) each get their own gate matrix. Gating is per output feature, so per-projection
  matrices are exactly one gate matrix over the concatenated outputs, split where the projections split; keeping
  them per layer keeps every layer an ordinary ``WFLinear`` (same state-dict keys, same backends).
* ``functional``: the attention calls ``F.linear(x, self.qkv.weight, bias)`` itself instead of calling its qkv
  module (timm BEiT / EVA / Swin-V2, torchvision Swin). While such a module runs with rows routed, a
  ``TorchFunctionMode`` sends exactly the ``F.linear`` calls whose weight IS a filtered projection's weight (checked
  by identity) to that layer (:meth:`wfnet.layers.WFLinear.linear`); every other op runs untouched. ``bias_parts``
  names the module's own bias parameters that it concatenates into that bias (BEiT: ``q_bias``, ``k_bias``,
  ``v_bias``): the projection gets an ``alpha_bias`` over the concatenated bias, gated like ``WFLinear``'s.
* ``folded``: the projections run on a folded batch (leading size k * B, each sample's k windows consecutive:
  window / grid partition attention). Declared here, never inferred from sizes; the router then repeats each row
  k times and raises when the leading size is not a multiple of the batch. A layer whose leading size is not the
  batch and that declares nothing raises (:meth:`wfnet.rows.Rows.on`).
* ``replace``: the whole module is replaced by a filtered one (``nn.MultiheadAttention`` ->
  :class:`wfnet.layers.WFMultiheadAttention`, whose in-projection parameters are not a module at all).

An attention module of an unregistered class is handled generically when its projections are child layers with the
usual names (``qkv``, ``q``, ``k``, ``v``, ``kv``, ``qk``, ``q_proj``, ``to_qkv``, ``query``, ...): they are filtered
and the coverage guard of :class:`wfnet.model.WFModel` raises on the first routed forward if the module bypasses them.
An unregistered module that owns projection-like parameters itself (``in_proj_weight``, ``q_bias`` / ``v_bias``
beside a ``qkv`` layer, ...) computes its projection in a way no adapter knows: it is refused at wrap time.

Some modules change what a layer's leading dimension means for their whole subtree, whatever attention class runs
inside: MobileViT unfolds each sample's feature map into ``patch_area`` sequences (``[B * P, N, C]``, sample-major),
so every filtered layer of its ``transformer`` runs on a folded batch (:func:`register_folding`); XCiT's Fourier
position encoding runs a conv on a grid with no sample axis at all, so it cannot take class rows and is left alone
(:func:`register_sample_free`).

Auxiliary heads that a model runs only in training mode (torchvision Inception-v3's ``AuxLogits``, GoogLeNet's
``aux1`` / ``aux2``) are declared with :func:`register_training_only`: their convs are filtered like the rest, and the
coverage guard of :class:`wfnet.model.WFModel` demands them only while the model is in training mode.

Extend with :func:`register_adapter`, :func:`register_folding`, :func:`register_sample_free`,
:func:`register_training_only`.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionAdapter", "register_adapter", "register_folding", "register_sample_free",
           "register_training_only", "find_training_only", "find_contexts", "adapter_for", "registered_adapters", "AttentionSite",
           "find_attention", "install_functional_route", "PROJECTION_NAMES"]

# Child names that hold a q / k / v projection in the attention implementations seen in timm, torchvision and the
# wider ecosystem (output projections -- proj, out_proj, to_out -- are deliberately absent).
PROJECTION_NAMES = ("qkv", "q", "k", "v", "kv", "qk", "wq", "wk", "wv", "q_proj", "k_proj", "v_proj", "qkv_proj",
                    "kv_proj", "to_qkv", "to_q", "to_k", "to_v", "to_kv", "query", "key", "value", "in_proj")

# Parameters an attention module may own when it computes its projection itself (refused unless registered).
_OWN_PROJECTION_PARAM = re.compile(r"^(in_proj_weight|in_proj_bias|[qkv]_proj_weight|qkv_weight|q_bias|k_bias|"
                                   r"v_bias|qkv_bias)$")


@dataclass(frozen=True)
class AttentionAdapter:
    """How one attention family computes its q / k / v projection (see the module docstring)."""

    family: str
    projections: tuple = ("qkv",)
    folded: bool = False
    functional: bool = False
    bias_parts: tuple = ()
    replace: bool = False
    # optional: module -> a reason it cannot be filtered (None when it can), checked at wrap time
    check: Callable[[nn.Module], str | None] | None = None
    # optional: module -> None, run once at wrap time before the projections are replaced
    prepare: Callable[[nn.Module], None] | None = None


_REGISTRY: dict[str, AttentionAdapter] = {}


def _key(cls) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(cls: type | str, adapter: AttentionAdapter) -> None:
    """Register ``adapter`` for an attention class (the class, or its ``"module.QualName"`` so that the library need
    not be imported). Replaces an earlier registration of the same class."""
    if not isinstance(adapter, AttentionAdapter):
        raise TypeError(f"register_adapter expects an AttentionAdapter, got {type(adapter).__name__}")
    _REGISTRY[_key(cls)] = adapter


def registered_adapters() -> dict[str, AttentionAdapter]:
    """Qualified class name -> adapter (a copy)."""
    return dict(_REGISTRY)


def adapter_for(module: nn.Module) -> AttentionAdapter | None:
    """The adapter registered for ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        adapter = _REGISTRY.get(_key(cls))
        if adapter is not None:
            return adapter
    return None


# --------------------------------------------------------------------------------------------------------- registry
def _separate_bias_off(module):
    # A bias "applied as a separate addition" (qkv(x) + cat(q_bias, k_bias, v_bias)) would bypass the gates; the
    # same function computed in one F.linear call (the family's default) lets the functional route gate it.
    # **decision**: switch such a module to the default at wrap time (output differs only by float rounding).
    if getattr(module, "qkv_bias_separate", False):
        module.qkv_bias_separate = False


def _mha_check(module):
    from .layers import WFMultiheadAttention

    why = WFMultiheadAttention.unsupported(module)
    return f"nn.MultiheadAttention with {why} is not supported" if why else None


_SEPARATE_BIASES = dict(functional=True, bias_parts=("q_bias", "k_bias", "v_bias"), prepare=_separate_bias_off)

for _cls, _adapter in {
    "timm.layers.attention.Attention": AttentionAdapter("timm Attention: one qkv Linear"),
    "timm.models.vision_transformer.Attention": AttentionAdapter("timm Attention: one qkv Linear"),
    "timm.models.swin_transformer.WindowAttention": AttentionAdapter(
        "timm Swin window attention: qkv Linear on windows", folded=True),
    "timm.models.swin_transformer_v2.WindowAttention": AttentionAdapter(
        "timm Swin-V2 window attention: F.linear on qkv.weight with q/v biases, on windows", folded=True,
        **_SEPARATE_BIASES),
    "timm.models.beit.Attention": AttentionAdapter(
        "timm BEiT attention: F.linear on qkv.weight with separate q/v biases", **_SEPARATE_BIASES),
    "timm.models.eva.EvaAttention": AttentionAdapter(
        "timm EVA attention (rotary): fused qkv via F.linear with q/v biases, or separate q/k/v_proj",
        projections=("qkv", "q_proj", "k_proj", "v_proj"), **_SEPARATE_BIASES),
    "timm.models.maxxvit.AttentionCl": AttentionAdapter(
        "timm MaxViT / CoAtNet channels-last attention: qkv Linear on window / grid partitions", folded=True),
    "timm.models.maxxvit.Attention2d": AttentionAdapter(
        "timm MaxViT / CoAtNet NCHW attention: qkv 1x1 Conv2d, on partitions or whole maps", folded=True),
    "timm.models.cait.ClassAttn": AttentionAdapter(
        "timm CaiT / XCiT class attention: separate q, k, v Linear", projections=("q", "k", "v")),
    "timm.models.cait.TalkingHeadAttn": AttentionAdapter("timm CaiT talking-heads attention: qkv Linear"),
    "timm.models.pvt_v2.Attention": AttentionAdapter(
        "timm PVT-v2 spatial-reduction attention: q and kv Linear", projections=("q", "kv")),
    "timm.models.twins.GlobalSubSampleAttn": AttentionAdapter(
        "timm Twins sub-sampled attention: q and kv Linear", projections=("q", "kv")),
    "timm.models.twins.LocallyGroupedAttn": AttentionAdapter("timm Twins locally-grouped attention: qkv Linear"),
    "timm.models.levit.Attention": AttentionAdapter("timm LeViT attention: qkv Linear + BatchNorm (LinearNorm)"),
    "timm.models.levit.AttentionDownsample": AttentionAdapter(
        "timm LeViT downsampling attention: q (subsample + LinearNorm) and kv LinearNorm", projections=("q", "kv")),
    "timm.models.xcit.XCA": AttentionAdapter("timm XCiT cross-covariance attention: qkv Linear"),
    "timm.models.convit.GPSA": AttentionAdapter(
        "timm ConViT gated positional attention: qk and v Linear", projections=("qk", "v")),
    "timm.models.convit.MHSA": AttentionAdapter("timm ConViT attention: qkv Linear"),
    "timm.models.crossvit.CrossAttention": AttentionAdapter(
        "timm CrossViT cross attention: wq, wk, wv Linear", projections=("wq", "wk", "wv")),
    "timm.models.efficientformer.Attention": AttentionAdapter("timm EfficientFormer attention: qkv Linear"),
    "timm.models.efficientformer_v2.Attention2d": AttentionAdapter(
        "timm EfficientFormer-V2 attention: q, k, v ConvNorm", projections=("q", "k", "v")),
    "timm.models.efficientformer_v2.Attention2dDownsample": AttentionAdapter(
        "timm EfficientFormer-V2 downsampling attention: q (local-global), k, v ConvNorm",
        projections=("q", "k", "v")),
    "torch.nn.modules.activation.MultiheadAttention": AttentionAdapter(
        "nn.MultiheadAttention: in-projection parameters (in_proj_weight / in_proj_bias), both batch_first layouts",
        projections=(), replace=True, check=_mha_check),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": AttentionAdapter(
        "torchvision Swin: F.linear on qkv.weight inside shifted_window_attention, on windows", functional=True,
        folded=True),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": AttentionAdapter(
        "torchvision Swin-V2: F.linear on qkv.weight (key bias zeroed) on windows", functional=True, folded=True),
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": AttentionAdapter(
        "torchvision MaxViT attention: to_qkv Linear on [B, partitions, tokens, C]", projections=("to_qkv",)),
    # window attention whose windows come from a sample-major partition ([B, H, W, C] -> [B * windows, ...], each
    # sample's windows consecutive), read off the partition code of timm 1.0 (window_partition / the inline view in
    # TinyVitBlock); a window equal to the whole map is the k = 1 case of the same declaration
    "timm.models.davit.WindowAttention": AttentionAdapter(
        "timm DaViT spatial window attention: qkv Linear on windows", folded=True),
    "timm.models.davit.ChannelAttention": AttentionAdapter("timm DaViT channel attention: qkv Linear on [B, N, C]"),
    "timm.models.davit.ChannelAttentionV2": AttentionAdapter(
        "timm DaViT channel attention (v2): qkv Linear on [B, N, C]"),
    "timm.models.tiny_vit.Attention": AttentionAdapter(
        "timm TinyViT window attention: qkv Linear on windows (or the whole map)", folded=True),
    "timm.models.gcvit.WindowAttentionGlobal": AttentionAdapter(
        "timm GCViT window attention: qkv (kv with a global query) Linear on windows", folded=True),
    "timm.models.mvitv2.MultiScaleAttention": AttentionAdapter(
        "timm MViTv2 pooling attention: qkv Linear, then pooling convs on [B * heads, ...]"),
}.items():
    register_adapter(_cls, _adapter)

_FOLDING: dict[str, tuple[str, tuple]] = {}
_SAMPLE_FREE: dict[str, str] = {}
_TRAINING_ONLY: dict[str, tuple[str, tuple]] = {}


def register_folding(cls: type | str, subtrees: tuple, family: str) -> None:
    """Declare that inside modules of class ``cls``, every filtered layer under the children ``subtrees`` runs on a
    folded batch (leading size k * B, each sample's k entries consecutive)."""
    _FOLDING[_key(cls)] = (family, tuple(subtrees))


def register_sample_free(cls: type | str, reason: str) -> None:
    """Declare that modules of class ``cls`` run on no sample axis (e.g. a position encoding computed once per
    forward): their layers are left alone, with ``reason``."""
    _SAMPLE_FREE[_key(cls)] = reason


register_folding("timm.models.mobilevit.MobileVitBlock", ("transformer",),
                 "timm MobileViT block: the transformer runs on [B * patch_area, N, C], sample-major")
# MViTv2 pools q / k / v with convs on [B * heads, head_dim, H, W] (reshape_pre_pool of a [B, heads, N, d] tensor:
# each sample's heads consecutive). Its pool-first variant (MultiScaleAttentionPoolFirst, used by no timm config) is
# not declared: its forward fails on its own in timm 1.0.31, so no declaration of it could be tested.
register_folding("timm.models.mvitv2.MultiScaleAttention", ("pool_q", "pool_k", "pool_v"),
                 "timm MViTv2 pooling convs: run on [B * heads, head_dim, H, W], sample-major")
def register_training_only(cls: type | str, subtrees: tuple, reason: str) -> None:
    """Declare that inside modules of class ``cls``, the children ``subtrees`` run only while that module is in
    training mode (an auxiliary head). The coverage guard then does not demand their filtered layers in a routed
    forward of the module in eval mode, and still demands them in training mode."""
    _TRAINING_ONLY[_key(cls)] = (reason, tuple(subtrees))


def find_training_only(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Module-path prefix of every declared training-only subtree of ``model`` -> (the path of the module whose
    ``training`` flag decides whether it runs, reason)."""
    found = {}
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            entry = _TRAINING_ONLY.get(_key(cls))
            if entry is not None:
                reason, subtrees = entry
                for sub in subtrees:
                    if getattr(module, sub, None) is not None:  # torchvision sets an absent aux head to None
                        found[f"{name}.{sub}" if name else sub] = (name, reason)
                break
    return found


# torchvision runs these heads under ``if self.aux... is not None: if self.training:`` (eval returns the logits alone)
register_training_only("torchvision.models.inception.Inception3", ("AuxLogits",),
                       "Inception-v3 auxiliary head: runs only in training mode")
register_training_only("torchvision.models.googlenet.GoogLeNet", ("aux1", "aux2"),
                       "GoogLeNet auxiliary heads: run only in training mode")
register_sample_free("timm.models.xcit.PositionalEncodingFourier",
                     "position encoding computed on a grid with no sample axis (cannot take class rows)")


def find_contexts(model: nn.Module) -> tuple[dict, dict]:
    """(folded: module-path prefix -> family, sample_free: module-path prefix -> reason) for ``model``."""
    folded, free = {}, {}
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            key = _key(cls)
            if key in _FOLDING:
                family, subtrees = _FOLDING[key]
                for sub in subtrees:
                    folded[f"{name}.{sub}" if name else sub] = family
                break
            if key in _SAMPLE_FREE:
                free[name] = _SAMPLE_FREE[key]
                break
    return folded, free


def under(name: str, prefixes) -> str | None:
    """The prefix of ``prefixes`` that contains module ``name`` (itself included), or None."""
    for p in prefixes:
        if not p or name == p or name.startswith(p + "."):
            return p
    return None


GENERIC = AttentionAdapter("attention with projection layers (generic: module calls, checked by the coverage guard)",
                           projections=PROJECTION_NAMES)


# -------------------------------------------------------------------------------------------------------- discovery
@dataclass
class AttentionSite:
    """One attention module of a model and what filters it."""

    name: str                      # the attention module's name in the model
    module: nn.Module
    adapter: AttentionAdapter
    registered: bool               # False: handled by the generic adapter
    projections: list = dataclasses.field(default_factory=list)  # (role, layer name) of every filterable leaf
    refused: str | None = None     # why this module cannot be filtered


def _leaves(module: nn.Module, prefix: str):
    """The nn.Linear / nn.Conv2d layers in ``module`` (itself included), with their names."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return [(prefix, module)]
    return [(f"{prefix}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every attention module of ``model`` (registered class, or a module with projection-named child layers) with
    its projection layers, in model order; refusals are recorded on the site, not raised."""
    from .layers import FilteredLayer

    sites, claimed = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        adapter = adapter_for(module)
        registered = adapter is not None
        children = dict(module.named_children())
        if adapter is None:
            if isinstance(module, (nn.Linear, nn.Conv2d, FilteredLayer)):
                continue
            owns = any(_OWN_PROJECTION_PARAM.match(n) for n, _ in module.named_parameters(recurse=False))
            if not owns and not any(n in children and _leaves(children[n], n) for n in PROJECTION_NAMES):
                continue
            adapter = GENERIC
        site = AttentionSite(name, module, adapter, registered)
        if adapter.replace:
            site.projections.append(("in-projection", name))
        for role in adapter.projections:
            try:
                child = module.get_submodule(role)
            except AttributeError:
                continue
            for leaf, _ in _leaves(child, role):
                site.projections.append((role, f"{name}.{leaf}" if name else leaf))
        own = sorted(n for n, p in module.named_parameters(recurse=False) if _OWN_PROJECTION_PARAM.match(n))
        if not registered and own:
            site.refused = (f"{type(module).__module__}.{type(module).__qualname__} owns projection parameters "
                            f"{own}: it computes its q/k/v projection itself, in a way no wfnet adapter knows "
                            f"(register one with wfnet.adapters.register_adapter)")
        elif adapter.check is not None:
            site.refused = adapter.check(module)
        if not site.projections and not site.refused:
            continue  # a registered class configured without projections here (e.g. EVA's qkv=None and no q_proj)
        sites.append(site)
        claimed.add(name)
    return sites


# --------------------------------------------------------------------------------------------- functional route
_ACTIVE = threading.local()


class _ProjectionRoute(TorchFunctionMode):
    """Sends ``F.linear(x, W, b)`` to the filtered layer whose weight IS ``W``; every other call runs unchanged."""

    def __init__(self, layers):
        super().__init__()
        self.layers = {id(layer.weight): layer for layer in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(weight))
            if layer is not None and weight is layer.weight:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return layer.linear(x, bias)
        return func(*args, **kwargs)


def _route_layers(module, roles):
    from .layers import WFLinear

    layers = []
    for role in roles:
        try:
            child = module.get_submodule(role)
        except AttributeError:
            continue
        if isinstance(child, WFLinear):
            layers.append(child)
    return layers


def _enter_route(roles, module, args):
    layers = _route_layers(module, roles)
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    if not layers or torch.compiler.is_compiling() or all(
            layer._router is None or layer._router.rows_object() is None for layer in layers):
        stack.append(None)  # nothing routed: the original forward, untouched
        return None
    mode = _ProjectionRoute(layers)
    mode.__enter__()
    stack.append(mode)
    return None


def _exit_route(module, args, output):
    mode = _ACTIVE.stack.pop()
    if mode is not None:
        mode.__exit__(None, None, None)
    return None


class _RouteHook:
    """A picklable / deep-copyable forward pre-hook that reads the module it runs on (no reference to layers)."""

    def __init__(self, roles):
        self.roles = tuple(roles)

    def __call__(self, module, args):
        return _enter_route(self.roles, module, args)


def install_functional_route(module: nn.Module, roles) -> None:
    """Route ``module``'s own ``F.linear`` calls on its filtered projections ``roles`` (see the module docstring).
    Idempotent."""
    if getattr(module, "_wfnet_route", False):
        return
    module.register_forward_pre_hook(_RouteHook(roles))
    module.register_forward_hook(_exit_route, always_call=True)
    module._wfnet_route = True
