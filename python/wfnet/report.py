"""Run-level evaluation and explanation: what ``wfnet evaluate RUN_DIR`` and ``wfnet explain RUN_DIR`` call.

``evaluate_run(run)`` computes every metric of :mod:`wfnet.metrics` for the original model, WF-Net and each
baseline present in the run (insertion / deletion for WF-Net only; RT not for the original) and writes Table 1
(Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion) as markdown and JSON under ``run_dir/eval/``, with the
paper's numbers for the same dataset / backbone beside them (:mod:`wfnet.paper`).

Caching: each (metric, method) pair has its own file ``run_dir/eval/<metric>_<method>.json`` holding the
parameters it was computed with and one entry per class, written (atomically) after every class. A rerun reuses
every class already there when the parameters match, so an interrupted evaluation resumes where it stopped;
``force=True`` recomputes everything. The caches cannot know that the run's models changed since: pass
``force=True`` after re-untraining.

``run`` follows the Run protocol of ``wfnet.experiment`` (``run_dir``, ``config``, ``num_classes``,
``class_names``, ``device``, ``data``, ``build_model(seed)``, ``original_model()``, ``wf_model()``,
``baseline_methods()``, ``baseline_model(method, c)``, ``baseline_classes(method)``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from . import metrics as M
from . import paper
from .serialization import write_text

__all__ = ["evaluate_run", "explain_run", "DEFAULT_ZRF_SEED", "METRICS"]

METRICS = ("acc", "zrf", "rt", "insdel")
# Seed of the random network ZRF compares against (**decision**: any fixed value; distinct from the usual
# training seeds so that the random network is not the original model's own initialisation).
DEFAULT_ZRF_SEED = 12345


# ----------------------------------------------------------------------------------------------------------------
# JSON helpers


def _clean(obj):
    """JSON-safe copy: NaN / inf -> None, tuples -> lists, int dict keys -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


_write_text = write_text


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


class _Cache:
    """Per-class results of one (metric, method), persisted after every class."""

    def __init__(self, path: Path, params: dict, force: bool):
        self.path, self.params = path, _clean(params)
        self.per_class: dict[str, object] = {}
        if path.exists() and not force:
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                saved = None
            if saved and saved.get("params") == self.params:
                self.per_class = saved.get("per_class", {})

    def missing(self, classes) -> list[int]:
        return [c for c in classes if str(c) not in self.per_class]

    def put(self, c: int, value) -> None:
        self.per_class[str(c)] = _clean(value)
        _write_json(self.path, {"params": self.params, "per_class": self.per_class})

    def get(self, classes) -> dict[int, object]:
        return {c: self.per_class[str(c)] for c in classes if str(c) in self.per_class}


def _read_cache(path: Path) -> dict[int, object]:
    if not path.exists():
        return {}
    try:
        return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).get("per_class", {}).items()}
    except (OSError, json.JSONDecodeError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------------------
# The evaluator


class _Evaluator:
    def __init__(self, run, *, force, batch_size, num_workers, progress, zrf_seed, rt, insdel_steps):
        self.run, self.force, self.progress = run, force, progress
        self.batch_size, self.num_workers = batch_size, num_workers
        self.zrf_seed, self.rt_params, self.insdel_steps = zrf_seed, rt, insdel_steps
        self.eval_dir = Path(run.run_dir) / "eval"
        self.device = torch.device(run.device)
        self._test_labels = None
        self._random_logits = None
        self._wf = None

    # data ----------------------------------------------------------------------------------------------------
    @property
    def test(self):
        return self.run.data.test

    def loader(self, dataset, shuffle=False):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def test_labels(self) -> torch.Tensor:
        if self._test_labels is None:
            self._test_labels = M.dataset_labels(self.test)
        return self._test_labels

    def class_indices(self, c: int) -> list[int]:
        idx = torch.nonzero(self.test_labels() == c).flatten().tolist()
        if not idx:
            raise ValueError(f"the test set has no sample of class {c}")
        return idx

    def class_loader(self, c: int):
        return self.loader(Subset(self.test, self.class_indices(c)))

    # models ----------------------------------------------------------------------------------------------------
    def wf(self):
        if self._wf is None:
            self._wf = self.run.wf_model()
        return self._wf

    def forward_for(self, method: str, c: int):
        if method == "wfnet":
            wf = self.wf()
            return lambda x: wf(x, forget=c)
        if method == "original":
            return self.original()
        return self.run.baseline_model(method, c)

    def original(self):
        if not hasattr(self, "_original"):
            self._original = self.run.original_model()
        return self._original

    def random_logits(self) -> torch.Tensor:
        """Logits of the randomly initialised network over the whole test set (computed once)."""
        if self._random_logits is None:
            net = self.run.build_model(seed=self.zrf_seed)
            net.eval()
            self._random_logits, _ = M.predict(net, self.loader(self.test), self.device)
        return self._random_logits

    def _bar(self, items, desc):
        from tqdm import tqdm
        return tqdm(items, desc=desc, disable=not self.progress or not items)

    # metrics ---------------------------------------------------------------------------------------------------
    def acc(self, method: str, classes: list[int]) -> dict[int, dict]:
        cache = _Cache(self.eval_dir / f"acc_{method}.json", {"metric": "acc"}, self.force)
        todo = cache.missing(classes)
        if todo and method == "original":  # one pass serves every class
            res = M.accuracy_forget_retain_shared(self.original(), self.loader(self.test), todo, self.device)
            for c in todo:
                cache.put(c, res["per_class"][c])
        else:
            for c in self._bar(todo, f"Acc_f/Acc_r {method}"):
                res = M.accuracy_forget_retain(lambda k: self.forward_for(method, k), self.loader(self.test), [c],
                                               self.device)
                cache.put(c, res["per_class"][c])
        return cache.get(classes)

    def zrf(self, method: str, classes: list[int]) -> dict[int, dict]:
        cache = _Cache(self.eval_dir / f"zrf_{method}.json", {"metric": "zrf", "random_seed": self.zrf_seed},
                       self.force)
        for c in self._bar(cache.missing(classes), f"ZRF {method}"):
            logits, _ = M.predict(self.forward_for(method, c), self.class_loader(c), self.device)
            rlogits = self.random_logits()[torch.as_tensor(self.class_indices(c))]
            p, q = torch.softmax(logits.double(), 1), torch.softmax(rlogits.double(), 1)
            cache.put(c, {"zrf": M.zrf(p, q), "zrf_bad_teaching": M.bad_teaching_from_logits(logits, rlogits),
                          "n": int(logits.shape[0])})
        return cache.get(classes)

    def rt(self, method: str, classes: list[int]) -> dict[int, dict]:
        cache = _Cache(self.eval_dir / f"rt_{method}.json", {"metric": "rt", **self.rt_params}, self.force)
        todo = cache.missing(classes)
        if not todo:
            return cache.get(classes)
        targets = self.acc("original", list(range(self.run.num_classes)))
        for c in self._bar(todo, f"RT {method}"):
            if method == "wfnet":
                model, forget = self.wf(), c
            else:
                model, forget = self.run.baseline_model(method, c), None
            res = M.relearn_time(model, self.run.data.train, self.class_loader(c), targets[c]["acc_f"],
                                 forget=forget, device=self.device, num_workers=self.num_workers, **self.rt_params)
            cache.put(c, {"epochs": res.epochs, "target": res.target, "accuracies": res.accuracies})
        return cache.get(classes)

    def insdel(self, classes: list[int]) -> dict[int, dict]:
        steps = M.gate_steps(self.insdel_steps).tolist()
        cache = _Cache(self.eval_dir / "insdel_wfnet.json", {"metric": "insdel", "steps": steps}, self.force)
        for c in self._bar(cache.missing(classes), "insertion/deletion"):
            cache.put(c, M.insertion_deletion(self.wf(), c, self.class_loader(c), steps, self.device))
        return cache.get(classes)


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _fmt(v, digits=1, scale=1.0) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def _label(method: str) -> str:
    key = paper.normalise_method(method)
    return paper.METHOD_LABELS.get(key, method) if key else method


def _table1(ev: _Evaluator, methods, classes_of, dataset, backbone, max_epochs) -> dict:
    paper_rows = paper.table1_rows(dataset, backbone) or {}
    rows = []
    for method in methods:
        classes = classes_of[method]
        acc = {c: v for c, v in _read_cache(ev.eval_dir / f"acc_{method}.json").items() if c in classes}
        zrf = {c: v for c, v in _read_cache(ev.eval_dir / f"zrf_{method}.json").items() if c in classes}
        rt = {c: v for c, v in _read_cache(ev.eval_dir / f"rt_{method}.json").items() if c in classes}
        row = {"method": method, "model": _label(method), "classes": classes,
               "acc_r": _mean(v["acc_r"] for v in acc.values()) if len(acc) == len(classes) else None,
               "acc_f": _mean(v["acc_f"] for v in acc.values()) if len(acc) == len(classes) else None,
               "zrf": _mean(v["zrf"] for v in zrf.values()) if len(zrf) == len(classes) else None,
               "zrf_bad_teaching": (_mean(v["zrf_bad_teaching"] for v in zrf.values())
                                    if len(zrf) == len(classes) else None)}
        if method != "original" and rt and len(rt) == len(classes):
            summary = M.summarize_relearn([rt[c]["epochs"] for c in classes], max_epochs)
            row.update(rt_mean=summary["mean"], rt_never=summary["never"], rt=summary["display"],
                       rt_per_class={c: rt[c]["epochs"] for c in classes})
        else:
            row.update(rt_mean=None, rt_never=None, rt="-" if method == "original" else "n/a")
        row["per_class"] = {c: {"acc_f": acc.get(c, {}).get("acc_f"), "acc_r": acc.get(c, {}).get("acc_r"),
                                "zrf": zrf.get(c, {}).get("zrf")} for c in classes}
        row["paper"] = paper_rows.get(paper.normalise_method(method) or "")
        rows.append(row)
    return {"dataset": dataset, "backbone": backbone, "num_classes": ev.run.num_classes,
            "paper_available": bool(paper_rows), "zrf_random_seed": ev.zrf_seed, "rt_params": ev.rt_params,
            "rows": rows}


def _table1_md(t: dict, run_dir) -> str:
    lines = [f"# Table 1: {t['dataset']} / {t['backbone']}", "",
             f"Run `{run_dir}`; means over the classes evaluated per row (all {t['num_classes']} unless noted).", "",
             "| model | Acc_r (%) ↑ | Acc_f (%) ↓ | ZRF (%) ↑ | RT ↑ | ZRF Bad-Teaching code (%) |"
             + (" paper Acc_r | paper Acc_f | paper ZRF | paper RT |" if t["paper_available"] else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|---|" if t["paper_available"] else "")]
    for r in t["rows"]:
        note = "" if len(r["classes"]) == t["num_classes"] else f" ({len(r['classes'])} classes)"
        cells = [r["model"] + note, _fmt(r["acc_r"], 2), _fmt(r["acc_f"], 2), _fmt(r["zrf"], 1, 100), r["rt"],
                 _fmt(r["zrf_bad_teaching"], 2, 100)]
        if t["paper_available"]:
            p = r["paper"]
            cells += ([_fmt(p["acc_r"], 2), _fmt(p["acc_f"], 2), _fmt(p["zrf"], 1, 100), p["rt"] or "-"] if p
                      else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    rt = t["rt_params"]
    lines += ["", "- Acc_r / Acc_f: accuracy with the model for class c on the other classes' / class c's test "
              "samples, mean over c. Acc_r: higher is better (ideal: the original's); Acc_f: lower is better "
              "(ideal 0).",
              f"- ZRF: 1 - mean JS(model, random network) on class c's test samples (textbook JS, natural log; "
              f"random network seed {t['zrf_random_seed']}), x100. Higher = closer to random behaviour. The last "
              "column is the Bad-Teaching code's variant (KL(m||p), averaged over classes too), x100.",
              f"- RT: epochs of {rt['samples_per_epoch']} random training samples (SGD lr {rt['lr']}, batch "
              f"{rt['batch_size']}, seed {rt['seed']}) until class c's accuracy is back at the original model's, "
              f"checked before the first epoch too (0 = never forgotten); \"mean (never)\": classes never relearned "
              f"within {rt['max_epochs']} epochs count as {rt['max_epochs']} in the mean. Higher is better.",
              "- Paper ZRF is shown as a percentage for every dataset (the paper prints ImageNet's as a fraction)."]
    return "\n".join(lines) + "\n"


def _table2(ev: _Evaluator, classes, dataset, backbone) -> dict:
    res = {c: v for c, v in _read_cache(ev.eval_dir / "insdel_wfnet.json").items() if c in classes}
    complete = len(res) == len(classes)
    row = {"method": "wfnet", "model": "WF-Net", "classes": classes,
           "insertion": _mean(v["insertion"]["auc"] for v in res.values()) if complete else None,
           "deletion": _mean(v["deletion"]["auc"] for v in res.values()) if complete else None,
           "per_class": {c: {"insertion": v["insertion"]["auc"], "deletion": v["deletion"]["auc"]}
                         for c, v in res.items()},
           "paper": paper.table2_row(dataset, backbone)}
    return {"dataset": dataset, "backbone": backbone, "paper_available": row["paper"] is not None,
            "steps": next(iter(res.values()))["insertion"]["steps"] if res else None, "rows": [row]}


def _table2_md(t: dict, run_dir) -> str:
    lines = [f"# Table 2: {t['dataset']} / {t['backbone']}", "", f"Run `{run_dir}`.", "",
             "| model | Insertion ↑ | Deletion ↓ |" + (" paper Ins | paper Del |" if t["paper_available"] else ""),
             "|---|---|---|" + ("---|---|" if t["paper_available"] else "")]
    for r in t["rows"]:
        cells = [r["model"], _fmt(r["insertion"], 3), _fmt(r["deletion"], 3)]
        if t["paper_available"]:
            cells += [_fmt(r["paper"]["insertion"], 2), _fmt(r["paper"]["deletion"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(t["steps"]) if t["steps"] else 0
    lines += ["", "- For class c, each filtered layer's channels are ranked by relevance (lowest sigmoid(alpha[c]) "
              "first). Insertion re-opens the top p% of every layer in the unlearned model (row c); deletion closes "
              "them in the original model (all gates open). Value: mean softmax confidence for class c on its test "
              "samples divided by the original model's; score: area under that curve for p in [0, 1] "
              f"({n} evenly spaced steps, trapezoid rule), mean over classes. Insertion: higher is better; "
              "deletion: lower is better."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def evaluate_run(run, *, metrics: Sequence[str] = METRICS, force: bool = False, rt_max_epochs: int = 100,
                 rt_samples_per_epoch: int = 500, rt_lr: float = 0.01, rt_batch_size: int = 64, rt_seed: int = 0,
                 insdel_steps: int | Sequence[float] = 21, zrf_seed: int = DEFAULT_ZRF_SEED, batch_size: int = 256,
                 num_workers: int = 0, methods: Sequence[str] | None = None, classes: Sequence[int] | None = None,
                 progress: bool = True) -> dict:
    """Compute the requested metrics for every method of the run and write Tables 1 and 2 under ``run_dir/eval``.

    ``metrics``: any of "acc" (Acc_f / Acc_r), "zrf", "rt" (relearn time; needs the original's per-class accuracy,
    computed if missing), "insdel" (WF-Net only). ``methods`` defaults to "original", every baseline present and
    "wfnet"; ``classes`` to all (a baseline is evaluated on the classes it has, ``run.baseline_classes``).
    The tables always report whatever is cached (a metric not computed yet shows "n/a"). Returns
    ``{"table1": {...}, "table2": {...}}`` (the JSON written to table1.json / table2.json).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose among {list(METRICS)}")
    if rt_max_epochs < 0:
        raise ValueError("rt_max_epochs must be >= 0")
    rt = {"max_epochs": int(rt_max_epochs), "samples_per_epoch": int(rt_samples_per_epoch), "lr": float(rt_lr),
          "batch_size": int(rt_batch_size), "seed": int(rt_seed)}
    ev = _Evaluator(run, force=force, batch_size=batch_size, num_workers=num_workers, progress=progress,
                    zrf_seed=zrf_seed, rt=rt, insdel_steps=insdel_steps)
    all_classes = list(range(run.num_classes)) if classes is None else sorted({int(c) for c in classes})
    bad = [c for c in all_classes if not 0 <= c < run.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range: num_classes={run.num_classes}")
    baselines = list(run.baseline_methods())
    methods = ["original", *baselines, "wfnet"] if methods is None else list(methods)
    for m in methods:
        if m not in ("original", "wfnet") and m not in baselines:
            raise ValueError(f"method {m!r} is not in this run; it has original, wfnet and {baselines}")
    classes_of = {m: (all_classes if m in ("original", "wfnet")
                      else [c for c in all_classes if c in set(run.baseline_classes(m))]) for m in methods}

    for m in methods:
        if not classes_of[m]:
            continue
        if "acc" in metrics:
            ev.acc(m, classes_of[m])
        if "zrf" in metrics:
            ev.zrf(m, classes_of[m])
        if "rt" in metrics and m != "original":
            ev.rt(m, classes_of[m])
    if "insdel" in metrics and "wfnet" in methods:
        ev.insdel(all_classes)

    dataset, backbone = str(run.config.get("dataset", "?")), str(run.config.get("model", "?"))
    t1 = _table1(ev, methods, classes_of, dataset, backbone, rt["max_epochs"])
    t2 = _table2(ev, all_classes, dataset, backbone)
    _write_json(ev.eval_dir / "table1.json", t1)
    _write_text(ev.eval_dir / "table1.md", _table1_md(t1, run.run_dir))
    _write_json(ev.eval_dir / "table2.json", t2)
    _write_text(ev.eval_dir / "table2.md", _table2_md(t2, run.run_dir))
    return {"table1": _clean(t1), "table2": _clean(t2)}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def explain_run(run, layers: Sequence[str] | None = None, force: bool = False, *, top_k: int = 10,
                min_classes: int = 2, max_classes: int = 20, insdel_steps: int | Sequence[float] = 21,
                batch_size: int = 256, num_workers: int = 0, progress: bool = True) -> dict:
    """Write the explanation figures of a run under ``run_dir/explain/`` and a ``report.md`` linking them.

    * ``gates_heatmap.png``: sigmoid(alpha_weight) of every filtered layer (classes x channels);
    * ``filter_map_<layer>.png`` for each of ``layers`` (default: the middle and the last filtered layer): the
      paper's Figures 3/4 (top-``top_k`` channels per class, channels shared by >= ``min_classes`` classes), over
      the first ``max_classes`` classes when there are more;
    * ``insertion_deletion.png``: the insertion / deletion curves per class and their mean (taken from, or
      computed into, the evaluation cache ``run_dir/eval/insdel_wfnet.json``).

    Existing figures are kept unless ``force``. Returns ``{"report": path, "figures": {name: path}}``.
    """
    from .explain import plot_filter_map, plot_gate_heatmaps, plot_insertion_deletion

    out = Path(run.run_dir) / "explain"
    wf = run.wf_model()
    names = list(wf.layer_names)
    if layers is None:
        layers = list(dict.fromkeys([names[(len(names) - 1) // 2], names[-1]]))
    unknown = [l for l in layers if l not in names]
    if unknown:
        raise ValueError(f"layers {unknown} are not filtered layers of this model; it has {names}")
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
            from .explain import filter_map_data
            data = filter_map_data(alphas[layer], top_k, min_classes, shown_classes)
        figures[f"filter_map {layer}"] = path
        notes[layer] = len(data["channels"])

    path = out / "insertion_deletion.png"
    ev = _Evaluator(run, force=False, batch_size=batch_size, num_workers=num_workers, progress=progress,
                    zrf_seed=DEFAULT_ZRF_SEED, rt={}, insdel_steps=insdel_steps)
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
    _write_text(report, "\n".join(lines) + "\n")
    return {"report": report, "figures": figures}
