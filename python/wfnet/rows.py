"""Class rows: the one home of the row type, its validation, and the router that hands rows to filtered layers.

A *row* is a class index 0..N_c-1 per sample: "run this sample as if class r was unlearned". Rows arrive as an int (one
row for the whole batch), a sequence or an integer tensor [B], or None (the original model). A sample may also forget
a SET of classes: a bool mask [B, N_c] (True = forget that class) or a list of class lists (see :mod:`wfnet.sets`,
which also says how the rows' gates compose); a mask has only its shape checked.

:class:`Rows` is a batch's rows after validation. It is built ONCE per model forward (``Rows.prepare``): dtype, shape
and range are checked where the rows live (on the CPU for CPU rows, so a GPU forward pays no sync for them; one
device-to-host sync for rows that arrive on a GPU), then every filtered layer of that forward asks for the device copy
(``Rows.on(device)``), which is made once (pinned + ``non_blocking`` for CPU -> CUDA) and reused. Nothing is re-checked
per layer. What the backward's deterministic class reduction needs (samples stably sorted by row, segment offsets per
class) is built once per batch and device as well (``Rows.segments``), with no host sync: the offsets come from a
``searchsorted`` over all N_c classes, so kernels launch a fixed grid over the classes and skip empty segments (the
vLLM multi-LoRA scheme) instead of sizing the grid from ``unique_consecutive``.

Under ``torch.compile`` the range check cannot run on the host (it would need the values); it becomes a device-side
assertion (``torch._assert_async``), so an out-of-range row still never reaches a kernel unchecked.

:class:`RowRouter`: each :class:`~wfnet.model.WFModel` owns one, shared by its filtered layers (a plain attribute, not
global state, so several wrapped models never see each other's rows). ``route()`` pushes one :class:`RouteFrame` per
forward (per thread: ``nn.DataParallel`` replicas and threaded servers share one router) and pops it in a ``finally``.
A frame also records which filtered layers asked for rows, which the model's coverage guard reads.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple

import torch

from . import sets

__all__ = ["Rows", "LayerRows", "RowRouter", "RouteFrame", "prepare_rows", "row_error"]

# Counts Rows.prepare calls that validated values (tests assert "once per forward, never per layer").
VALIDATIONS = [0]


def row_error(value: int, num_classes: int) -> ValueError:
    return ValueError(f"forget row {value} is out of range: num_classes={num_classes}, valid rows are "
                      f"0..{num_classes - 1}")


def _shape_error(batch: int, shape) -> ValueError:
    return ValueError(f"forget rows must have shape [{batch}] (one class row per sample), got {list(shape)}")


class Rows:
    """Validated class rows of one batch: ``value`` is an int (same row for every sample) or an int64 tensor [batch]
    on the device the rows arrived on. Build with :meth:`prepare`; read with :meth:`on` / :meth:`segments`."""

    __slots__ = ("value", "num_classes", "batch", "_on", "_segments")

    def __init__(self, value, num_classes: int, batch: int | None):
        self.value = value
        self.num_classes = int(num_classes)
        self.batch = batch
        self._on: dict = {}
        self._segments: dict = {}

    @classmethod
    def prepare(cls, rows, num_classes: int, batch: int | None = None) -> "Rows | None":
        """Validate ``rows`` once (dtype, shape, and range against ``num_classes``). ``batch``, when known, is the
        expected length of a tensor of rows. A :class:`Rows` is returned as it is (after a num_classes/batch check)."""
        if rows is None:
            return None
        if isinstance(rows, Rows):
            if rows.num_classes != num_classes:
                raise ValueError(f"rows were prepared for num_classes={rows.num_classes}, this model has "
                                 f"{num_classes}")
            if batch is not None and rows.batch is not None and rows.batch != batch:
                raise _shape_error(batch, [rows.batch])
            return rows
        if not torch.compiler.is_compiling():  # a Python counter in a compiled region would guard and recompile
            VALIDATIONS[0] += 1
        if isinstance(rows, bool):
            raise TypeError("forget rows must be an int or an integer tensor, got a bool")
        if isinstance(rows, int):
            if not 0 <= rows < num_classes:
                raise row_error(rows, num_classes)
            return cls(rows, num_classes, None)
        if isinstance(rows, (list, tuple)) and sets.is_set_list(rows):  # one class list per sample: a mask
            rows = sets.sets_to_mask(rows, num_classes)
        if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
            # a set per sample [B, N_c]: only its shape is checked (any bool is valid), so nothing is read from the
            # device (no sync, nothing data-dependent under torch.compile)
            sets.check_mask(rows, num_classes, batch)
            return cls(rows, num_classes, rows.shape[0])
        if not isinstance(rows, torch.Tensor):
            try:
                rows = torch.as_tensor(rows)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"forget rows must be an int, a sequence of ints or an integer tensor: {exc}") from None
        if rows.dtype == torch.bool:  # e.g. a nested list / numpy array of bools
            sets.check_mask(rows, num_classes, batch)
            return cls(rows, num_classes, rows.shape[0])
        if rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise TypeError(f"forget rows must be an integer tensor (int64 class ids) or a bool mask [B, "
                            f"num_classes], got dtype {rows.dtype}")
        if rows.dim() == 0:
            if torch.compiler.is_compiling():  # no int() of a traced value: one row per sample, on the device
                rows = rows.reshape(1) if batch is None else rows.reshape(1).expand(batch)
            else:
                VALIDATIONS[0] -= 1  # counted once, in the recursive call (never reached while compiling)
                return cls.prepare(int(rows), num_classes, batch)
        if rows.dim() != 1:
            hint = (f"; for a SET of classes per sample pass a bool mask [B, {num_classes}] or a list of class "
                    f"lists")
            if batch is not None:
                raise ValueError(str(_shape_error(batch, rows.shape)) + hint)
            raise ValueError(f"forget rows must be an int or a 1-d tensor [B] (one class row per sample), got shape "
                             f"{list(rows.shape)}" + hint)
        if batch is not None and rows.shape[0] != batch:
            raise _shape_error(batch, rows.shape)
        rows = rows.long()
        if rows.numel() and rows.device.type != "meta":
            if torch.compiler.is_compiling():
                # no host values inside a compiled graph: assert on the device instead
                torch._assert_async(((rows >= 0) & (rows < num_classes)).all(),
                                    f"forget row out of range: num_classes={num_classes}")
            else:
                lo, hi = torch.aminmax(rows)
                lo, hi = torch.stack([lo, hi]).tolist()  # one device-to-host copy (none for CPU rows)
                if lo < 0 or hi >= num_classes:
                    raise row_error(lo if lo < 0 else hi, num_classes)
        return cls(rows, num_classes, rows.shape[0])

    # -------------------------------------------------------------------------------------------------- reading
    def on(self, device, n: int | None = None, folded: bool = False) -> torch.Tensor:
        """The rows as an int64 tensor [n] on ``device`` (made once per device and length, then reused).

        ``n`` is the layer input's leading size (default: the batch). When it is not the batch, only a layer that
        declares a folded batch (``folded=True``: each sample's ``n // batch`` entries are consecutive, as in window
        attention) gets each row repeated; anything else raises rather than guess.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        batch = self.batch
        if n is None:
            if batch is None:
                raise ValueError("rows given as one int need the batch size")
            n = batch
        fold = 1
        if batch is not None and n != batch:
            if not folded:
                raise _shape_error(n, [batch])
            if batch == 0 or n % batch:
                raise ValueError(f"a folded layer's leading size {n} is not a multiple of the batch size {batch}")
            fold = n // batch
        key = (device, n)
        # nothing is cached while compiling / exporting (n may be a SymInt there, which is unhashable)
        cached = None if torch.compiler.is_compiling() else self._on.get(key)
        if cached is not None:
            return cached
        if isinstance(self.value, int):
            t = torch.full((n,), self.value, dtype=torch.long, device=device)
        elif self.is_set:  # the bool mask [n, N_c]; a folded sample's set repeated
            t = self._move(self.value, device)
            if fold > 1:
                t = t.repeat_interleave(fold, dim=0)
        else:
            t = self._move(self.value, device)
            if fold > 1:
                t = t.repeat_interleave(fold)
        if not torch.compiler.is_compiling():
            self._on[key] = t
        return t

    @staticmethod
    def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device == device:
            return t
        if t.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():
            # a copy from pageable memory blocks the host; from pinned memory it is queued on the stream
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def segments(self, device, n: int | None = None, folded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, starts)`` for deterministic per-class reductions over the rows on ``device``: ``perm`` [n] sorts
        the samples by row (stable), ``starts`` [N_c + 1] gives class r's samples as ``perm[starts[r]:starts[r+1]]``
        (empty for classes without samples). Built once per batch and device, no host sync. Not defined for sets
        (a sample of a set contributes to several rows; their gradient flows through the composition instead)."""
        if self.is_set:
            raise TypeError("segments() is for one class row per sample; forget sets have no per-class segments")
        idx = self.on(device, n, folded)
        key = (idx.device, idx.shape[0])
        cached = None if torch.compiler.is_compiling() else self._segments.get(key)
        if cached is not None:
            return cached
        seg = class_segments(idx, self.num_classes)
        if not torch.compiler.is_compiling():
            self._segments[key] = seg
        return seg

    @property
    def is_set(self) -> bool:
        """Whether these are forget SETS (a bool mask [B, N_c]; see wfnet.sets)."""
        return isinstance(self.value, torch.Tensor) and self.value.dtype == torch.bool

    def bind(self, x: torch.Tensor, folded: bool = False) -> "LayerRows":
        """These rows for one layer input ``x`` (see :meth:`on`), as the backends take them."""
        if self.is_set:
            return LayerRows(None, self, folded, self.on(x.device, x.shape[0], folded))
        return LayerRows(self.on(x.device, x.shape[0], folded), self, folded)

    def __repr__(self):
        if self.is_set:
            return f"Rows(sets: mask{list(self.value.shape)} on {self.value.device}, num_classes={self.num_classes})"
        what = self.value if isinstance(self.value, int) else f"tensor[{self.batch}] on {self.value.device}"
        return f"Rows({what}, num_classes={self.num_classes})"


class LayerRows(NamedTuple):
    """What a backend gets: the validated rows of its input (``index``, int64 [n] on the input's device) and where
    they came from, so that per-batch structures (``segments()``) are shared by every layer of the forward.

    For forget SETS, ``index`` is None and ``mask`` is the bool mask [n, N_c] on the input's device; ``wfnet.ops``
    composes the gates (``wfnet.sets``) and hands the backends per-sample gates instead of rows."""

    index: torch.Tensor | None
    rows: Rows
    folded: bool = False
    mask: torch.Tensor | None = None

    def segments(self, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's class segments, shared by every layer (:meth:`Rows.segments`); a bare index (no ``rows``,
        e.g. a backend called directly) gets its own, for ``num_classes`` classes."""
        if self.rows is None:
            if num_classes is None:
                raise ValueError("LayerRows without its Rows needs num_classes for its class segments")
            return class_segments(self.index, num_classes)
        return self.rows.segments(self.index.device, self.index.shape[0], self.folded)


def class_segments(index: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, starts)`` of an int64 row index (see :meth:`Rows.segments`, which caches them per batch): a stable
    sort, and class r's samples as ``perm[starts[r]:starts[r+1]]``. No host sync."""
    sorted_rows, perm = torch.sort(index, stable=True)
    return perm, torch.searchsorted(sorted_rows, torch.arange(num_classes + 1, device=index.device))


def prepare_rows(rows, num_classes: int, batch: int | None = None) -> Rows | None:
    """Validate ``rows`` for a model with ``num_classes`` classes (see :meth:`Rows.prepare`)."""
    return Rows.prepare(rows, num_classes, batch)


class RouteFrame:
    """The rows of one routed forward, the filtered layers (by id) that asked for them, and the folded outputs whose
    BatchNorm / activation is still to step aside (``fold``: see :mod:`wfnet.fold`)."""

    __slots__ = ("rows", "used", "fold")

    def __init__(self, rows: Rows | None):
        self.rows = rows
        self.used: set[int] = set()
        self.fold: list = []


class RowRouter:
    """A per-thread stack of :class:`RouteFrame` (rows, or None for "no filtering") shared by a model's layers."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        # how the model's gates compose for a set of classes (WFModel.set_composition; wfnet.sets)
        self.composition = sets.DEFAULT_COMPOSITION
        self._local = threading.local()
        self._local.stack = []  # made now for this thread: torch.compile would otherwise recompile after call one

    @property
    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def active(self) -> bool:
        """Whether rows (or an explicit None) are routed in this thread."""
        return bool(self._stack)

    def __getstate__(self):  # a copied / pickled model starts with no active rows
        return {"num_classes": self.num_classes, "composition": self.composition}

    def __setstate__(self, state):
        self.num_classes = state["num_classes"]
        self.composition = state.get("composition", sets.DEFAULT_COMPOSITION)
        self._local = threading.local()
        self._local.stack = []

    @contextlib.contextmanager
    def route(self, rows, batch: int | None = None) -> Iterator[RouteFrame]:
        """Validate ``rows`` once and make them the active rows of this thread inside the block."""
        frame = RouteFrame(Rows.prepare(rows, self.num_classes, batch))
        self._stack.append(frame)
        try:
            with sets.model_composition(self.composition):
                yield frame
        finally:
            self._stack.pop()

    def current(self) -> RouteFrame | None:
        stack = self._stack
        return stack[-1] if stack else None

    def rows_for(self, layer, x: torch.Tensor, folded: bool = False) -> LayerRows | None:
        """The active rows bound to ``layer``'s input ``x`` (index int64 [x.shape[0]] on x's device), or None when
        nothing is routed. Records that ``layer`` ran in this frame (the coverage guard reads it)."""
        frame = self.current()
        if frame is None:
            return None
        if not torch.compiler.is_compiling():
            frame.used.add(id(layer))
        if frame.rows is None:
            return None
        return frame.rows.bind(x, folded)

    def rows_object(self) -> Rows | None:
        """The active :class:`Rows` (None when nothing or None is routed)."""
        frame = self.current()
        return None if frame is None else frame.rows
