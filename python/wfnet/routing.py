"""Row routing: how one forward pass hands the batch's class rows to every filtered layer of a model.

Each :class:`~wfnet.model.WFModel` owns one :class:`RowRouter`, shared by its filtered layers (a plain attribute,
not global state, so several wrapped models never see each other's rows). ``WFModel.forward(x, forget=rows)`` and
the ``wfnet.forgetting(wf, rows)`` context push the rows on the router's stack and pop them in a ``finally``, so
nested calls and exceptions leave it clean. Rows are validated once when pushed, not in every layer.

The stack is per thread: ``nn.DataParallel`` replicas and threaded servers share one router object, and each
thread's forward pass must see only its own rows.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from .ops import check_rows


class RowRouter:
    """A stack of active forget rows (an int, an int64 tensor [B], or None for "no filtering")."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self._local = threading.local()

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
        return {"num_classes": self.num_classes}

    def __setstate__(self, state):
        self.num_classes = state["num_classes"]
        self._local = threading.local()

    def normalise(self, rows, batch: int | None = None):
        """Validate rows (range, dtype, and length when the batch size is known)."""
        if rows is None:
            return None
        if isinstance(rows, int) and not isinstance(rows, bool):
            check_rows(rows, 1, self.num_classes, "cpu")  # range check only; expanded to [B] in each layer
            return rows
        if not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(rows)
        if rows.dim() == 0 and not rows.dtype.is_floating_point and rows.dtype != torch.bool:
            return self.normalise(int(rows), batch)
        if batch is None:  # forgetting(): the length is checked against each layer's input later
            if rows.dim() != 1 and not (rows.dtype.is_floating_point or rows.dtype == torch.bool):
                raise ValueError(f"forget rows must be an int or a 1-d tensor [B] (one class row per sample), got "
                                 f"shape {list(rows.shape)}")
            batch = rows.shape[0] if rows.dim() == 1 else -1
        return check_rows(rows, batch, self.num_classes, rows.device)

    @contextlib.contextmanager
    def route(self, rows, batch: int | None = None) -> Iterator[None]:
        self._stack.append(self.normalise(rows, batch))
        try:
            yield
        finally:
            self._stack.pop()

    def rows_for(self, x: torch.Tensor):
        """The active rows as an int64 tensor [x.shape[0]] on x's device, or None when nothing is routed."""
        if not self._stack:
            return None
        rows = self._stack[-1]
        if rows is None:
            return None
        batch = x.shape[0]
        if isinstance(rows, int):
            return torch.full((batch,), rows, dtype=torch.long, device=x.device)
        if rows.shape[0] != batch:
            raise ValueError(f"forget rows must have shape [{batch}] (one class row per sample), got "
                             f"{list(rows.shape)}")
        return rows.to(x.device)
