"""Checkpoints without pickle: tensors in a safetensors file, everything else as JSON in its metadata.

Used for the trained models (``state_dict``) and for resumable training state (optimizer state, counters). Writes are
atomic (temp file + rename), so a run killed mid-save keeps its previous checkpoint. A file damaged afterwards
(truncated copy, disk fault) is read as :class:`wfnet.files.CorruptFileError` naming it (:func:`read_safetensors`),
never as safetensors' own error.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import CorruptFileError, atomic_write

__all__ = ["save_state", "load_state", "read_state_meta", "save_model", "load_model_weights", "optimizer_to_flat",
           "optimizer_from_flat", "read_safetensors"]


@contextlib.contextmanager
def read_safetensors(path, what: str, device="cpu", hint: str | None = None) -> Iterator:
    """``safe_open(path)`` for reading; a file safetensors cannot parse (truncated, damaged, not safetensors at all)
    raises :class:`CorruptFileError` naming it as ``what``, with ``hint`` (what to do) in its message. A missing file
    raises FileNotFoundError as before."""
    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device=str(device))
    except SafetensorError as exc:
        raise CorruptFileError(path, what, str(exc), hint) from None
    with handle as f:
        try:
            yield f
        except SafetensorError as exc:  # a tensor read past a damaged region
            raise CorruptFileError(path, what, str(exc), hint) from None


def save_state(path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"wfnet_state": json.dumps(meta or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(path, device="cpu", what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON metadata) of a checkpoint; CorruptFileError (naming it as ``what``) when it is damaged."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with read_safetensors(path, what, device) as f:
        meta = json.loads((f.metadata() or {}).get("wfnet_state", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def read_state_meta(path, what: str = "checkpoint") -> dict:
    """The JSON metadata of a checkpoint, without reading its tensors (the header only); CorruptFileError when the
    file is damaged."""
    with read_safetensors(path, what) as f:
        return json.loads((f.metadata() or {}).get("wfnet_state", "{}"))


def save_model(model: torch.nn.Module, path, meta: dict | None = None) -> None:
    """Save a model's state_dict (tied / shared tensors are stored once per name)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_state(path, state, meta)


def load_model_weights(model: torch.nn.Module, path, strict: bool = True) -> dict:
    tensors, meta = load_state(path, what="model weights file")
    model.load_state_dict(tensors, strict=strict)
    return meta


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors and JSON-able values."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
