"""Evaluating forget SETS: per set, Acc_f of each class in the set, Acc_r on the other classes and ZRF, for WF-Net
(composed gates, :mod:`wfnet.sets`) beside the original model, the single-class WF-Net rows of the same classes, and
a reference model retrained from scratch without the set.

The quantities, for a set S (every test sample is run with S as its set):

* Acc_f(c), c in S: accuracy on the test samples of class c (goal: about 0, like a model never trained on c);
* Acc_r: accuracy on the test samples of every class outside S (goal: the original's on the same samples);
* ZRF: 1 - mean JS(p, q) over the test samples of the classes in S, q from a randomly initialised network of the
  same architecture (seed ``zrf_seed``, as Table 1's);
* "single-class rows": the mean over c in S of the accuracy of row c alone on the same retain samples (what one
  class's WF-Net row keeps; the bar a composition should not fall far below), and their mean Acc_f;
* "retrained": a model of the run's architecture trained with the run's training options on the training set
  without the classes of S (``retrain_without``; saved under ``<run>/baselines/retrain-sets/``).

Every model is run once over the test set per set (logits kept on the CPU, one pass per model and set).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from . import metrics as M
from . import sets as S
from .data import labels_of
from .seeds import derive_seed

__all__ = ["SetEvalConfig", "random_sets", "set_row", "evaluate_sets", "retrain_without", "sets_table_md",
           "retrain_path"]

RETRAIN_DIR = Path("baselines") / "retrain-sets"


@dataclass
class SetEvalConfig:
    """What ``wfnet evaluate --sets`` / ``--set-size K --num-sets M`` computes."""

    sets: list = field(default_factory=list)   # explicit sets (lists of class ids)
    set_size: int | None = None                # plus num_sets random sets of this size ...
    num_sets: int = 0
    seed: int = 0                              # ... drawn with this seed
    compositions: tuple = ()                   # () = the model's own (wf.set_composition, restored with its gates)
    retrain: int = 1                           # retrain a reference without the set for the first `retrain` sets
    batch_size: int = 512
    zrf_seed: int = 12345

    def all_sets(self, num_classes: int) -> list[list[int]]:
        chosen = [sorted(s) for s in self.sets]
        for s in chosen:
            S.sets_to_mask([s], num_classes)  # raises on duplicates / out of range
            if not s or len(s) >= num_classes:
                raise ValueError(f"a set to evaluate needs 1..{num_classes - 1} classes, got {s}")
        if self.set_size is not None and self.num_sets > 0:
            chosen += [s for s in random_sets(num_classes, self.set_size, self.num_sets, self.seed)
                       if s not in chosen]
        if not chosen:
            raise ValueError("no set to evaluate: give sets (e.g. --sets 3,7 1,4,9) or --set-size K --num-sets M")
        return chosen


def random_sets(num_classes: int, size: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct random sets of ``size`` classes (sorted), drawn with ``seed``."""
    if not 1 <= size < num_classes:
        raise ValueError(f"set size must be in 1..{num_classes - 1} for {num_classes} classes, got {size}")
    total = math.comb(num_classes, size)
    if count > total:
        raise ValueError(f"only {total} distinct sets of {size} among {num_classes} classes, asked for {count}")
    g = torch.Generator().manual_seed(derive_seed(seed, "random-sets", size))
    out: list[list[int]] = []
    while len(out) < count:
        s = sorted(torch.randperm(num_classes, generator=g)[:size].tolist())
        if s not in out:
            out.append(s)
    return out


def set_row(logits: torch.Tensor, labels: torch.Tensor, members: Sequence[int],
            rlogits: torch.Tensor | None = None) -> dict:
    """Acc_f per class of ``members``, Acc_r on the rest, ZRF over the members' samples (with ``rlogits`` of the
    random network), from one model's test logits."""
    pred = logits.argmax(1)
    in_set = torch.zeros_like(labels, dtype=torch.bool)
    acc_f = {}
    for c in members:
        sel = labels == c
        in_set |= sel
        acc_f[int(c)] = 100.0 * float((pred[sel] == c).sum()) / max(int(sel.sum()), 1)
    keep = ~in_set
    acc_r = 100.0 * float((pred[keep] == labels[keep]).sum()) / max(int(keep.sum()), 1)
    row = {"acc_f": acc_f, "acc_f_max": max(acc_f.values()), "acc_f_mean": sum(acc_f.values()) / len(acc_f),
           "acc_r": acc_r}
    if rlogits is not None:
        row["zrf"] = M.zrf_from_logits(logits[in_set], rlogits[in_set])
    return row


def _logits(forward, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return M.predict(forward, loader, device)


def _set_forward(wf, mask: torch.Tensor):
    def forward(x):
        return wf(x, forget=mask.to(x.device).unsqueeze(0).expand(x.shape[0], -1))
    return forward


def retrain_path(run, members: Sequence[int]) -> Path:
    return Path(run.run_dir) / RETRAIN_DIR / f"set_{'-'.join(str(c) for c in sorted(members))}.safetensors"


def retrain_without(run, members: Sequence[int], progress: bool = False):
    """The run's architecture trained from scratch, with the run's training options, on its training set without
    the classes of ``members``; cached in ``retrain_path(run, members)`` (reused when the original is unchanged)."""
    from .checkpoint import load_model_weights, read_state_meta, save_model
    from .train import TrainConfig, train_classifier

    path = retrain_path(run, members)
    stamp = run.original_info().get("stamp")
    if path.exists() and read_state_meta(path).get("original_stamp") == stamp:
        model = run.build_model()
        load_model_weights(model, path)
        return model.eval(), float(read_state_meta(path).get("seconds", float("nan")))
    data = run.data
    labels = labels_of(data.train)
    keep = ~torch.isin(labels, torch.tensor(sorted(members)))
    train_wo = Subset(data.train, keep.nonzero().flatten().tolist())
    cfg = TrainConfig(**(run.config.get("train") or {}))
    model = run.build_model(seed=cfg.seed)
    t0 = time.time()
    train_classifier(model, train_wo, data.test, cfg, run.device, progress=progress,
                     desc=f"retrain -{','.join(map(str, members))}")
    seconds = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, {"classes": sorted(int(c) for c in members), "original_stamp": stamp,
                             "train": run.config.get("train"), "seconds": seconds})
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), seconds


def evaluate_sets(run, cfg: SetEvalConfig, progress: bool = False, wf=None, log=print) -> dict:
    """Per set of ``cfg``: WF-Net (each composition), original, single-class rows and (for the first ``cfg.retrain``
    sets) the retrained reference. Returns ``{"sets": [...], "rows": [...], "config": ...}``; one row per model and
    set with ``acc_f`` (per class), ``acc_f_max``, ``acc_f_mean``, ``acc_r``, ``zrf``."""
    device = run.device
    test = run.data.test
    loader = DataLoader(test, batch_size=cfg.batch_size)
    chosen = cfg.all_sets(run.num_classes)
    wf = wf if wf is not None else run.wrapped()
    original = run.original_model()
    logits_o, labels = _logits(original, loader, device)
    rlogits, _ = _logits(run.build_model(seed=cfg.zrf_seed), loader, device)
    single = {}  # class -> logits of its WF-Net row (computed once per class used)
    compositions = tuple(cfg.compositions) or (wf.set_composition,)
    rows = []
    for i, members in enumerate(chosen):
        log(f"set {members} ({i + 1}/{len(chosen)})")
        mask = S.sets_to_mask([members], run.num_classes)[0]
        base = {"set": members, "size": len(members)}
        rows.append({**base, "model": "original", **set_row(logits_o, labels, members, rlogits)})
        for c in members:
            if c not in single:
                single[c] = _logits(lambda x, c=c: wf(x, forget=c), loader, device)[0]
        per = [set_row(single[c], labels, members) for c in members]
        rows.append({**base, "model": "single-class rows", "acc_r": sum(r["acc_r"] for r in per) / len(per),
                     "acc_f": {c: set_row(single[c], labels, [c])["acc_f"][c] for c in members},
                     "note": "row c alone, mean over c in the set; Acc_f(c) with row c"})
        rows[-1]["acc_f_max"] = max(rows[-1]["acc_f"].values())
        rows[-1]["acc_f_mean"] = sum(rows[-1]["acc_f"].values()) / len(members)
        for how in compositions:
            with S.use_composition(how):
                lg, _ = _logits(_set_forward(wf, mask), loader, device)
            rows.append({**base, "model": f"WF-Net set ({how})", **set_row(lg, labels, members, rlogits)})
        if i < cfg.retrain:
            model, seconds = retrain_without(run, members, progress)
            lg, _ = _logits(model, loader, device)
            rows.append({**base, "model": "retrained without the set", "seconds": seconds,
                         **set_row(lg, labels, members, rlogits)})
    return {"sets": chosen, "rows": rows, "test_samples": len(labels),
            "config": {"compositions": list(compositions), "seed": cfg.seed, "zrf_seed": cfg.zrf_seed}}


def _fmt(v, digits=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def sets_table_md(result: dict, title: str = "Forget sets") -> str:
    """The per-set table as markdown: Acc_f per class in the set, max Acc_f, Acc_r on the rest, ZRF."""
    lines = [f"# {title}", "",
             f"Every test sample ({result['test_samples']}) run with the set as its forget set. Acc_f (%) per class "
             f"of the set (lower is better), Acc_r (%) on the test samples of the other classes (higher is better), "
             f"ZRF (%) over the set's samples against a random network (higher = closer to random).", "",
             "| set | model | Acc_f per class (%) | max Acc_f | Acc_r (%) | ZRF (%) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        per = ", ".join(f"{c}: {_fmt(v)}" for c, v in r["acc_f"].items())
        zrf = r.get("zrf")
        lines.append(f"| {{{', '.join(map(str, r['set']))}}} | {r['model']} | {per} | {_fmt(r['acc_f_max'])} | "
                     f"{_fmt(r['acc_r'])} | {_fmt(None if zrf is None else 100 * zrf)} |")
    lines += ["", "- single-class rows: each class's own WF-Net row alone; Acc_r is their mean on the same retain "
              "samples (the bar a set should stay near), Acc_f(c) is row c's on class c.",
              "- retrained without the set: the run's architecture and training options on the training set without "
              "the set's classes (the reference a set should resemble)."]
    return "\n".join(lines) + "\n"


def run(run, cfg: SetEvalConfig, progress: bool = False, log=print) -> dict:
    """The forget-set evaluation of a run folder (what ``wfnet evaluate --sets`` / ``--set-size K --num-sets M``
    does): :func:`evaluate_sets`, then ``<run>/eval/sets.json`` and ``<run>/eval/sets.md`` beside Table 1. Returns
    the result with its ``markdown``."""
    from . import files

    result = evaluate_sets(run, cfg, progress=progress, log=log)
    result["run"] = str(run.run_dir)
    result["untrain"] = run.untrain_options()
    title = f"Forget sets: {run.config.get('dataset')} / {run.config.get('model')}"
    md = sets_table_md(result, title)
    set_size = (result["untrain"] or {}).get("set_size", 0)
    md += (f"- gates untrained with label expansion over sets of 1..{set_size} classes (`--set-size {set_size}`); "
           f"composition: {', '.join(result['config']['compositions'])}.\n" if set_size else
           f"- gates untrained with one class row per sample (no `--set-size`): sets compose rows that were never "
           f"trained together (docs/results/sets); composition: {', '.join(result['config']['compositions'])}.\n")
    root = Path(run.run_dir) / "eval"
    root.mkdir(parents=True, exist_ok=True)
    files.write_json(root / "sets.json", result)
    files.write_text(root / "sets.md", md)
    result["markdown"] = md
    return result
