"""Explanations from the gates: filter maps (the paper's Figures 3/4), gate heatmaps, insertion/deletion curves.

The gates are an explanation: a small sigmoid(alpha_weight[c, j]) means channel j is one that class c depends on.
``relevance = 1 - sigmoid(alpha_weight)`` (0 = untouched, 1 = fully closed for that class).

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), never
pyplot, so importing this module neither needs a display nor changes the caller's matplotlib backend. Every function
takes plain tensors / dicts (the data functions are separate from the drawing ones, and tested on their own) and
writes one PNG atomically.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .config import opt, opt_list
from .errors import RunError
from .evaluate import EvalConfig, Evaluator
from .files import atomic_write, write_text
from .report import fmt as _fmt
from .report import mean as _mean
from .run import Run

__all__ = ["relevance", "filter_map_data", "plot_filter_map", "plot_gate_heatmaps", "plot_insertion_deletion",
           "ExplainConfig", "run"]


@dataclass
class ExplainConfig:
    """Filter maps, gate heatmaps and insertion / deletion curves: ``wfnet explain``."""
    layers: list[str] | None = opt_list("comma-separated filtered layer names (default: the middle and the last one)")
    top_k: int = opt(10, "channels per class in the filter maps")
    min_classes: int = opt(2, "a channel is drawn when it is in the top-k of at least this many classes")
    max_classes: int = opt(20, "classes drawn in the filter maps")
    insdel_steps: int = opt(21, "points on the insertion / deletion curves")
    test_limit: int | None = opt(None, "curves on the fixed random test subset of `wfnet evaluate --test-limit` "
                                       "(default: the whole test set)")


def relevance(alpha_weight: torch.Tensor) -> torch.Tensor:
    """1 - sigmoid(alpha_weight) [N_c, C] in fp32 on CPU: how strongly each class closes each channel."""
    return 1.0 - torch.sigmoid(alpha_weight.detach().float().cpu())


def filter_map_data(alpha_weight: torch.Tensor, top_k: int = 10, min_classes: int = 2,
                    classes: Sequence[int] | None = None) -> dict:
    """The data of a filter map (paper's Figures 3/4) for one layer.

    For each class in ``classes`` (default all), its ``top_k`` channels by relevance (lowest sigmoid(alpha) first);
    a channel is kept when it is in the top-k of at least ``min_classes`` of those classes. Returns
    ``{"classes", "channels" (kept, ascending ids), "member" (bool [n_classes, n_channels]: in that class's top-k),
    "relevance" (float [n_classes, n_channels]), "top" ({class: its top-k channel ids})}``.
    """
    if alpha_weight.dim() != 2:
        raise ValueError(f"alpha_weight must be [num_classes, channels], got {list(alpha_weight.shape)}")
    n_c, n_ch = alpha_weight.shape
    classes = list(range(n_c)) if classes is None else [int(c) for c in classes]
    if not classes or any(not 0 <= c < n_c for c in classes):
        raise ValueError(f"classes must be a non-empty list of ids in 0..{n_c - 1}, got {classes}")
    if top_k < 1 or min_classes < 1:
        raise ValueError("top_k and min_classes must be >= 1")
    rel = relevance(alpha_weight)[classes]
    k = min(top_k, n_ch)
    top = torch.topk(rel, k, dim=1).indices  # [n_classes, k]
    member_all = torch.zeros(len(classes), n_ch, dtype=torch.bool)
    member_all.scatter_(1, top, True)
    keep = torch.nonzero(member_all.sum(0) >= min_classes).flatten()
    return {"classes": classes, "channels": keep.tolist(), "member": member_all[:, keep].numpy(),
            "relevance": rel[:, keep].numpy(), "top": {c: top[i].tolist() for i, c in enumerate(classes)}}


def _save(fig, path) -> str:
    path = os.fspath(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_filter_map(alpha_weight: torch.Tensor, class_names: Sequence[str], path, layer_name: str = "",
                    top_k: int = 10, min_classes: int = 2, classes: Sequence[int] | None = None) -> dict:
    """Draw the filter map of one layer as a class x channel image and write it to ``path`` (PNG).

    Colour = relevance (1 - sigmoid(alpha)); a dot marks the cells where the channel is in that class's top-k.
    Only channels shared by at least ``min_classes`` classes are drawn; when no channel is shared, the union of the
    top-k channels is drawn instead and the title says so. Returns the data of :func:`filter_map_data`.
    """
    data = filter_map_data(alpha_weight, top_k, min_classes, classes)
    shown = data
    note = f"channels in the top-{top_k} of >= {min_classes} classes"
    if not data["channels"]:
        shown = filter_map_data(alpha_weight, top_k, 1, classes)
        note = f"no channel is shared by {min_classes} classes; showing every top-{top_k} channel"
    names = [str(class_names[c]) if c < len(class_names) else str(c) for c in shown["classes"]]
    n_cls, n_ch = shown["relevance"].shape
    fig = _figure(min(26.0, max(6.0, 1.5 + 0.32 * n_ch)), min(20.0, max(3.0, 1.6 + 0.32 * n_cls)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown["relevance"], cmap="magma_r", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ys, xs = np.nonzero(shown["member"])
    ax.scatter(xs, ys, s=14, c="#00c0ff", edgecolors="black", linewidths=0.4)
    ax.set_xticks(range(n_ch))
    ax.set_xticklabels([str(ch) for ch in shown["channels"]], rotation=90 if n_ch > 12 else 0, fontsize=8)
    ax.set_yticks(range(n_cls))
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlabel("channel id")
    ax.set_ylabel("class")
    ax.set_title(f"Filter map {layer_name}: {note}\n(blue dot: channel in that class's top-{top_k})", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("relevance = 1 - sigmoid(alpha)")
    _save(fig, path)
    return data


def plot_gate_heatmaps(alphas: dict[str, torch.Tensor], class_names: Sequence[str], path,
                       max_cols: int = 4) -> str:
    """sigmoid(alpha_weight) per layer (classes x channels), one subplot per layer in a grid, shared colour scale
    [0, 1] (dark = closed). ``alphas`` maps layer name -> alpha_weight [N_c, C]."""
    if not alphas:
        raise ValueError("no layer to draw")
    names = list(alphas)
    n_c = next(iter(alphas.values())).shape[0]
    cols = min(max_cols, len(names))
    rows = math.ceil(len(names) / cols)
    panel_h = min(6.0, max(2.2, 0.22 * n_c + 1.0))
    fig = _figure(4.2 * cols + 1.2, panel_h * rows + 0.6)
    label_classes = n_c <= 25
    im = None
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        gates = torch.sigmoid(alphas[name].detach().float().cpu()).numpy()
        im = ax.imshow(gates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        closed = int((gates < 0.5).sum())
        ax.set_title(f"{name}  ({gates.shape[1]} ch, {closed} gates < 0.5)", fontsize=8)
        ax.set_xlabel("channel", fontsize=7)
        ax.tick_params(labelsize=6)
        if i % cols == 0 and label_classes:
            ax.set_yticks(range(n_c))
            ax.set_yticklabels([str(class_names[c]) if c < len(class_names) else str(c) for c in range(n_c)],
                               fontsize=6)
        elif i % cols == 0:
            ax.set_ylabel("class", fontsize=7)
        else:
            ax.set_yticks([])
    fig.suptitle("sigmoid(alpha_weight) per filtered layer (row = class forgotten, 1 = channel kept)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    cax = fig.add_axes((0.945, 0.1, 0.015, 0.8))
    fig.colorbar(im, cax=cax).set_label("gate", fontsize=8)
    return _save(fig, path)


def plot_insertion_deletion(per_class: dict[int, dict], class_names: Sequence[str], path) -> str:
    """Insertion and deletion curves: one thin line per class, the mean in black, the mean AUCs in the titles.

    ``per_class`` maps class -> ``{"insertion": {"steps", "curve", "auc"}, "deletion": {...}}`` as returned by
    :func:`wfnet.metrics.insertion_deletion`.
    """
    if not per_class:
        raise ValueError("no insertion/deletion result to draw")
    fig = _figure(11.0, 4.3)
    many = len(per_class) > 10
    for j, (mode, better) in enumerate((("insertion", "higher is better"), ("deletion", "lower is better"))):
        ax = fig.add_subplot(1, 2, j + 1)
        curves = []
        for c, res in sorted(per_class.items()):
            steps = 100.0 * np.asarray(res[mode]["steps"])
            curve = np.asarray(res[mode]["curve"])
            curves.append(curve)
            label = None if many else (str(class_names[c]) if c < len(class_names) else str(c))
            ax.plot(steps, curve, lw=1.0, alpha=0.35 if many else 0.8, label=label)
        mean = np.mean(np.stack(curves), axis=0)
        auc = np.mean([res[mode]["auc"] for res in per_class.values()])
        ax.plot(steps, mean, color="black", lw=2.5, label="mean")
        ax.set_title(f"{mode.capitalize()}: mean AUC {auc:.3f} ({better})", fontsize=10)
        ax.set_xlabel(f"% of most relevant channels {'re-opened' if mode == 'insertion' else 'closed'} per layer")
        ax.set_ylabel("class confidence / original's")
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(per_class) > 5 else 1)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Run level: what `wfnet explain` (wfnet.Run.explain) writes


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def run(run: Run, cfg: ExplainConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
    """The ``explain`` stage: write the explanation figures of a run under ``run_dir/explain/`` and a ``report.md``
    linking them.

    * ``gates_heatmap.png``: sigmoid(alpha_weight) of every filtered layer (classes x channels);
    * ``filter_map_<layer>.png`` for each of ``cfg.layers`` (default: the middle and the last filtered layer): the
      paper's Figures 3/4 (top-``top_k`` channels per class, channels shared by >= ``min_classes`` classes), over
      the first ``max_classes`` classes when there are more;
    * ``insertion_deletion.png``: the insertion / deletion curves per class and their mean (taken from, or
      computed into, the evaluation cache ``run_dir/eval/insdel_wfnet.json``; ``test_limit``: on the same fixed
      test subset as ``wfnet evaluate --test-limit``, so the curves Table 2 was computed from are reused).

    Existing figures are kept unless ``force``. Returns ``{"report": path, "figures": {name: path}}``.
    """
    cfg = cfg or ExplainConfig()
    layers, top_k, min_classes, max_classes = cfg.layers, cfg.top_k, cfg.min_classes, cfg.max_classes
    out = Path(run.run_dir) / "explain"
    wf = run.wrapped()
    names = list(wf.layer_names)
    if layers is None:
        layers = list(dict.fromkeys([names[(len(names) - 1) // 2], names[-1]]))
    unknown = [l for l in layers if l not in names]
    if unknown:
        raise RunError(f"layers {unknown} are not filtered layers of this model; it has {names}")
    alphas = {n: layer.alpha_weight.detach() for n, layer in wf.filtered_layers().items()}
    class_names = list(run.class_names)
    shown_classes = list(range(min(run.num_classes, max_classes)))
    figures, notes = {}, {}

    path = out / "gates_heatmap.png"
    if force or not path.exists():
        plot_gate_heatmaps(alphas, class_names, path)
    figures["gates_heatmap"] = path

    for layer in layers:
        path = out / f"filter_map_{_safe(layer)}.png"
        data = None
        if force or not path.exists():
            data = plot_filter_map(alphas[layer], class_names, path, layer, top_k, min_classes, shown_classes)
        else:
            data = filter_map_data(alphas[layer], top_k, min_classes, shown_classes)
        figures[f"filter_map {layer}"] = path
        notes[layer] = len(data["channels"])

    path = out / "insertion_deletion.png"
    ev = Evaluator(run, EvalConfig(insdel_steps=cfg.insdel_steps, test_limit=cfg.test_limit), progress=progress)
    ev._wf = wf
    curves = ev.insdel(list(range(run.num_classes)))
    if force or not path.exists():
        plot_insertion_deletion(curves, class_names, path)
    figures["insertion_deletion"] = path

    ins = _mean(v["insertion"]["auc"] for v in curves.values())
    dele = _mean(v["deletion"]["auc"] for v in curves.values())
    lines = [f"# Explanations: {run.config.get('dataset', '?')} / {run.config.get('model', '?')}", "",
             f"Run `{run.run_dir}`, {run.num_classes} classes, {len(names)} filtered layers. Relevance of channel j "
             "for class c = 1 - sigmoid(alpha_weight[c, j]).", "",
             f"Gates: `filters.safetensors`, stamp `{run.model_stamp('wfnet')}`.", "",
             "## Gates per layer", "", "![gates](gates_heatmap.png)", "",
             "sigmoid(alpha_weight) of every filtered layer: one row per forgotten class, one column per channel; "
             "dark cells are the channels closed to forget that class.", "", "## Filter maps (paper's Figures 3/4)", ""]
    for layer in layers:
        fname = f"filter_map_{_safe(layer)}.png"
        lines += [f"### {layer}", "", f"![filter map {layer}]({fname})", "",
                  f"Top-{top_k} channels per class (of classes {shown_classes[0]}..{shown_classes[-1]}); "
                  f"{notes[layer]} channels are in the top-{top_k} of at least {min_classes} classes.", ""]
    lines += ["## Insertion / deletion", "", "![insertion and deletion](insertion_deletion.png)", "",
              f"Mean insertion AUC {_fmt(ins, 3)} (higher is better), mean deletion AUC {_fmt(dele, 3)} "
              "(lower is better); see `../eval/table2.md` for the definition."]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return {"report": report, "figures": figures}
