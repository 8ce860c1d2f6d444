"""Forgetting a SET of classes per sample: the mask form of the rows, and how the class rows' gates compose.

A sample may forget several classes at once ("this customer asked to forget classes 3 and 7"). Its set is one row of
a bool mask ``[B, N_c]`` (True = forget that class for that sample); ``forget=`` also takes a list of class lists
(``[[3, 7], [1, 4, 9], []]``), turned into that mask here. An all-False
row is the original model for that sample (every composed gate is exactly 1). Under ``torch.compile`` /
``torch.export`` pass the mask: class lists are Python values, so a compiled model would specialise on each one.

The gates of a set are composed from its classes' rows, per output channel (``alpha``: the layer's logits [N_c, C]):

* ``"product"``: ``g = prod_{r in set} sigmoid(alpha[r])``, computed as ``exp(mask @ logsigmoid(alpha))`` (one small
  matmul, no [B, N_c, C] intermediate; an empty set gives exp(0) = 1 exactly). Each class closes the channel
  independently, so a channel any class of the set depends on closes at least as far as it does for that class.
* ``"min"``: ``g = min_{r in set} sigmoid(alpha[r]) = sigmoid(min_{r in set} alpha[r])``: the most closed row wins;
  the open level of the other channels is that of a single row. Builds a [B, N_c, C] intermediate.
* ``"relative"``: ``g = top * prod_{r in set} sigmoid(alpha[r]) / top`` with ``top`` the channel's most open gate over
  all rows: the product of each class's closure relative to the channel's open level, times that level once (so
  gates that are open but below 1 do not compound over the set). A one-class set gives that row's gate.

**decision** (measured, docs/results/sets/README.md): the default is ``"relative"``. Gates untrained one class per
sample do not compose under any of the three (closing several classes' channels costs up to 70 points of Acc_r, or
leaves classes of the set recognised), so sets need gates untrained with sets (``wfnet untrain --set-size K``). On
such gates the three keep the same Acc_r, and ``"relative"`` closes the classes of 5-class sets best (the lowest worst
Acc_f in every one of 5 set-untrained runs); training with it or with ``"product"`` made no measurable difference, so
one composition serves both. Which one applies is :func:`get_composition`: a ``use_composition(name)`` block if one
is open, else the routed model's own (``WFModel.set_composition``: the one its gates were untrained with, saved in
the filters file and restored by ``load_filters``), else the default. ``wfnet untrain --set-composition`` sets it
for training and stores it with the gates.

Everything here is plain differentiable torch on the mask with no data-dependent Python control flow and no host
sync, so gradients reach the gate logits through the composition (untraining with sets), and ``torch.compile`` /
``torch.export`` trace it once for every set of the same batch size. The backends receive the composed gates as
per-sample gates (``g``, ``gb``: fp32 [B, C], the convention of ``wf_kernels.gates.sample_gates``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["COMPOSITIONS", "DEFAULT_COMPOSITION", "compose_gates", "set_gates", "sets_to_mask", "is_set_list",
           "check_mask", "get_composition", "use_composition", "model_composition", "check_composition", "mask_to_sets",
           "parse_sets"]

COMPOSITIONS = ("product", "min", "relative")
DEFAULT_COMPOSITION = "relative"
_state = threading.local()


def check_composition(name) -> str:
    if name not in COMPOSITIONS:
        raise ValueError(f"unknown gate composition {name!r}; choose one of {', '.join(COMPOSITIONS)}")
    return name


def get_composition(default: str | None = None) -> str:
    """The composition the filtered layers use now (this thread): an open ``use_composition`` block's, else the
    routed model's (``model_composition``, pushed by a WFModel's routing), else ``default``, else the default."""
    for key in ("stack", "models"):
        stack = getattr(_state, key, None)
        if stack:
            return stack[-1]
    return default or DEFAULT_COMPOSITION


@contextlib.contextmanager
def _pushed(key: str, name: str) -> Iterator[None]:
    check_composition(name)
    stack = getattr(_state, key, None)
    if stack is None:
        stack = []
        setattr(_state, key, stack)
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def use_composition(name: str):
    """Compose set gates with ``name`` (one of :data:`COMPOSITIONS`) inside the block (this thread only), whatever
    the model's own composition."""
    return _pushed("stack", name)


def model_composition(name: str):
    """The routed model's composition inside the block (a WFModel's routing opens it; a ``use_composition`` block
    still wins)."""
    return _pushed("models", name)


# ------------------------------------------------------------------------------------------------------ the mask
def is_set_list(value) -> bool:
    """Whether ``value`` is a list / tuple of class collections (lists, tuples, sets, 1-d int tensors)."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return any(_is_collection(v) for v in value)


def _is_collection(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 1 and not v.dtype.is_floating_point and v.dtype != torch.bool
    return isinstance(v, (list, tuple, set, frozenset, range))


def sets_to_mask(sets, num_classes: int) -> torch.Tensor:
    """A list of class collections as a bool mask [len(sets), num_classes] on the CPU. Raises for an entry that is
    not a collection of ints, a class outside 0..num_classes-1, or a class twice in one set."""
    if not all(_is_collection(s) for s in sets):
        bad = next(s for s in sets if not _is_collection(s))
        raise TypeError(f"forget sets: every entry must be a list of class ids (a set of classes per sample), got "
                        f"{bad!r}; do not mix one-class ints and class lists (write [c] for a one-class set)")
    rows = []
    for i, s in enumerate(sets):  # checked in Python: class lists are host values (a mask is what compiles)
        ids = s.tolist() if isinstance(s, torch.Tensor) else list(s)
        row = [False] * num_classes
        for c in ids:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"forget set {i} holds {c!r}; class ids must be ints")
            if not 0 <= c < num_classes:
                raise ValueError(f"forget set {i} holds class {c}, out of range: num_classes={num_classes}, valid "
                                 f"classes are 0..{num_classes - 1}")
            if row[c]:
                raise ValueError(f"forget set {i} lists class {c} twice: {ids}")
            row[c] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(sets), num_classes)


def check_mask(mask: torch.Tensor, num_classes: int, batch: int | None) -> None:
    """Shape checks of a bool mask [B, N_c] (no values are read: any bool mask of the right shape is valid). A 0-d
    or 1-d bool tensor is a TypeError, as before sets existed: a [B] bool vector is not a set per sample, and
    reading it as one set for the whole batch would silently misread it whenever B == N_c."""
    if mask.dim() < 2:
        raise TypeError(f"forget rows must be int64 class ids [B] or a 2-d bool mask [B, {num_classes}] (a set of "
                        f"classes per sample); got a {mask.dim()}-d bool tensor of shape {list(mask.shape)} (for one "
                        f"set for the whole batch, expand a [1, {num_classes}] mask to [B, {num_classes}])")
    if mask.dim() != 2 or mask.shape[1] != num_classes or (batch is not None and mask.shape[0] != batch):
        want = f"[{'B' if batch is None else batch}, {num_classes}]"
        raise ValueError(f"a forget mask must have shape {want} (batch, num_classes; True = forget that class for "
                         f"that sample), got {list(mask.shape)}")


def mask_to_sets(mask: torch.Tensor) -> list[list[int]]:
    """The class lists of a bool mask [B, N_c] (host values: for reports, not for forward passes)."""
    return [torch.nonzero(row).flatten().tolist() for row in mask.cpu()]


def parse_sets(text: str, num_classes: int | None = None) -> list[int]:
    """``"3,7"`` -> ``[3, 7]`` (a command-line set), checked for duplicates and, given ``num_classes``, range."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise ValueError(f"a class set is comma-separated class ids like 3,7; got {text!r}") from None
    if not ids:
        raise ValueError(f"empty class set {text!r}")
    if num_classes is not None:
        sets_to_mask([ids], num_classes)  # raises on duplicates / out of range
    elif len(set(ids)) != len(ids):
        raise ValueError(f"class set {text!r} lists a class twice")
    return ids


# ------------------------------------------------------------------------------------------------------ composing
def compose_gates(alpha: torch.Tensor, mask: torch.Tensor, how: str | None = None) -> torch.Tensor:
    """The composed gates fp32 [n, C] of the sets in ``mask`` (bool [n, N_c]) from the logits ``alpha`` [N_c, C]
    (differentiable in ``alpha``). An all-False row gives gates of exactly 1."""
    how = how or get_composition()
    a = alpha.to(torch.promote_types(alpha.dtype, torch.float32))  # fp32 at least (fp64 kept for gradcheck)
    dev = a.device.type
    with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
        if how == "product":
            # exp(sum of log-gates of the set's rows); logsigmoid is exact where sigmoid underflows
            return torch.exp(mask.to(a.dtype) @ F.logsigmoid(a))
        if how == "min":
            big = torch.full((), float("inf"), dtype=a.dtype, device=a.device)
            return torch.sigmoid(torch.where(mask.unsqueeze(-1), a.unsqueeze(0), big).amin(1))
        if how == "relative":
            # each class scales the channel by its gate RELATIVE to the channel's most open row (so gates that are
            # merely "open but not 1" do not compound), on top of that open level once: a one-class set is exactly
            # that row, the empty set exactly 1
            ls = F.logsigmoid(a)
            top = ls.amax(0, keepdim=True)  # [1, C]
            m = mask.to(a.dtype)
            return torch.exp(m @ (ls - top) + m.amax(1, keepdim=True) * top)
    raise ValueError(f"unknown gate composition {how!r}; choose one of {', '.join(COMPOSITIONS)}")


def set_gates(alpha_weight: torch.Tensor, alpha_bias: torch.Tensor | None, bias: torch.Tensor | None,
              mask: torch.Tensor, how: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample gates of a layer for the sets in ``mask``, as the backends take them: ``(g, gb)``, fp32 [n, C]:
    the weight gate and the gated bias ``gate_b * b`` (``b`` alone when the layer has no bias gates; None without a
    bias): the convention of ``wf_kernels.gates.sample_gates``."""
    g = compose_gates(alpha_weight, mask, how)
    if bias is None:
        return g, None
    b = bias.float()
    if alpha_bias is None:
        return g, b.unsqueeze(0).expand(mask.shape[0], -1)
    return g, compose_gates(alpha_bias, mask, how) * b
