"""Saving and loading the gate matrices with safetensors (never pickle), written atomically.

A filters file holds, for every filtered layer ``name``, the tensors ``name.alpha_weight`` (and ``name.alpha_bias``),
plus string metadata: ``format`` ("wfnet-filters"), ``num_classes``, ``layers`` (JSON list, model order),
``wfnet_version``, ``backbone`` (the inner model's class), ``set_composition`` (how the gates compose for a set of
classes, ``WFModel.set_composition``; restored by :func:`load_filters`, so sets never run with a composition the gates
were not untrained for) and any extra user metadata.

A file safetensors cannot parse (truncated, damaged, not safetensors) raises :class:`wfnet.CorruptFileError` (a
ValueError) naming it and saying what to do, from :func:`load_filters` and :func:`read_filters_metadata` alike.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from . import sets
from ._version import __version__
from .checkpoint import read_safetensors
from .files import atomic_write
from .model import WFModel

__all__ = ["save_filters", "load_filters", "read_filters_metadata"]

FORMAT = "wfnet-filters"
_WHAT = "filters file"
_HINT = ("delete it and recreate it: untrain again (in a run folder, `wfnet untrain <run>` writes it anew) or save "
         "the gates again with wfnet.save_filters, or restore a good copy")


def save_filters(wf: WFModel, path, metadata: dict | None = None) -> None:
    """Save only the gate matrices of ``wf`` (plus metadata) to a safetensors file, atomically."""
    if not isinstance(wf, WFModel):
        raise TypeError(f"save_filters expects a WFModel, got {type(wf).__name__}")
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in wf.named_filter_parameters()}
    meta = {
        "format": FORMAT,
        "num_classes": str(wf.num_classes),
        "layers": json.dumps(wf.layer_names),
        "wfnet_version": __version__,
        "backbone": type(wf.model).__name__,
        "set_composition": wf.set_composition,
    }
    reserved = sorted(set(map(str, metadata or {})) & set(meta))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved by the filters format; rename them")
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_filters_metadata(path) -> dict:
    """The metadata of a filters file (the header only); CorruptFileError when it is damaged."""
    with read_safetensors(path, _WHAT, hint=_HINT) as f:
        return dict(f.metadata() or {})


def load_filters(wf: WFModel, path) -> dict:
    """Load gates saved by :func:`save_filters` into ``wf`` after checking they fit, and the set composition they
    were untrained with (``wf.set_composition``; files from before it was stored: the one in their untraining options,
    else the default they were made with); returns the file's metadata.

    Raises ValueError (nothing is modified) when the file is not a wfnet filters file, or its num_classes, layer
    names or tensor shapes differ from the model's; :class:`wfnet.CorruptFileError` (a ValueError) when it is
    damaged or truncated.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no filters file at {path}")
    with read_safetensors(path, _WHAT, hint=_HINT) as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a wfnet filters file (metadata format={meta.get('format')!r})")
        missing_keys = [k for k in ("num_classes", "layers") if k not in meta]
        if missing_keys:
            raise ValueError(f"{path} is an incomplete wfnet filters file: metadata lacks {missing_keys}")
        n = int(meta["num_classes"])
        if n != wf.num_classes:
            raise ValueError(f"{path} holds gates for num_classes={n}, the model has num_classes={wf.num_classes}")
        layers = json.loads(meta["layers"])
        if layers != wf.layer_names:
            missing = sorted(set(wf.layer_names) - set(layers))
            extra = sorted(set(layers) - set(wf.layer_names))
            raise ValueError(f"{path} does not match the model's filtered layers: missing from file {missing}, "
                             f"not in model {extra}" + ("" if missing or extra else " (different order)"))
        composition = meta.get("set_composition") or _json_get(meta.get("untrain"), "set_composition") or \
            sets.DEFAULT_COMPOSITION
        if composition not in sets.COMPOSITIONS:
            raise ValueError(f"{path}: unknown set_composition {composition!r} in its metadata (this wfnet knows "
                             f"{', '.join(sets.COMPOSITIONS)}); a newer wfnet wrote it?")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(wf.named_filter_parameters())
    if set(tensors) != set(params):
        raise ValueError(f"{path} gate tensors {sorted(set(tensors) ^ set(params))} do not match the model")
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {k} has shape {list(tensors[k].shape)}, the model expects {list(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    wf.set_composition = composition
    return meta


def _json_get(text, key):
    """``key`` of a JSON object stored as metadata text (None when absent or not an object)."""
    try:
        obj = json.loads(text) if text else None
    except ValueError:
        return None
    return obj.get(key) if isinstance(obj, dict) else None
