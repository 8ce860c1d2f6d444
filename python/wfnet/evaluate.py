"""Run-level evaluation: what ``wfnet evaluate`` (:meth:`wfnet.Run.evaluate`) computes and writes.

:func:`evaluate_run` computes every metric of :mod:`wfnet.metrics` for the original model, WF-Net and each baseline
present in the run (insertion / deletion for WF-Net only; RT not for the original) and writes Table 1 (Acc_r, Acc_f,
ZRF, RT) and Table 2 (insertion, deletion) as markdown and JSON under ``run_dir/eval/`` (rendered by
:mod:`wfnet.report`), in one commit.

Caching: each (metric, method) pair has its own file ``run_dir/eval/<metric>_<method>.json`` holding the
parameters it was computed with and one entry per class, written (atomically) after every class. Each entry names
the stamp of the model it measured (``run.model_stamp(method, c)``): an entry of a model that has since been
replaced is recomputed, so the caches never outlive their models. A rerun reuses every other entry, so an
interrupted evaluation resumes where it stopped; ``force=True`` recomputes everything.

``run`` follows the protocol of :class:`wfnet.Run` (``run_dir``, ``config``, ``num_classes``, ``class_names``,
``device``, ``data``, ``build_model(seed)``, ``original_model()``, ``wrapped()``, ``model_stamp(method, c)``,
``baseline_methods()``, ``baseline_model(method, c)``, ``baseline_classes(method)``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from . import files
from . import metrics as M
from . import paper
from .config import AUDIT_METRICS, EvalConfig, METRICS
from .report import mean as _mean
from .report import method_label as _label
from .report import table1_md, table2_md

__all__ = ["evaluate_run", "METRICS", "DEFAULT_ZRF_SEED"]

_TEST_SUBSET_SEED = 2024  # the fixed subset of --test-limit (any fixed value)
DEFAULT_ZRF_SEED = EvalConfig.zrf_seed  # **decision**: any fixed value, distinct from the usual training seeds

class _Cache:
    """Per-class results of one (metric, method), persisted after every class; an entry counts only while the
    model it was computed from (its stamp) is still the run's."""

    def __init__(self, path: Path, params: dict, force: bool, stamp):
        self.path, self.params, self.stamp = path, files.json_safe(params), stamp
        self.per_class: dict[str, object] = {}
        if path.exists() and not force:
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                saved = None
            if saved and saved.get("params") == self.params:
                self.per_class = saved.get("per_class", {})

    def _valid(self, c) -> bool:
        entry = self.per_class.get(str(c))
        return isinstance(entry, dict) and entry.get("stamp") == self.stamp(c)

    def missing(self, classes) -> list[int]:
        return [c for c in classes if not self._valid(c)]

    def put(self, c: int, value) -> None:
        self.per_class[str(c)] = {**files.json_safe(value), "stamp": self.stamp(c)}
        files.write_json(self.path, {"params": self.params, "per_class": self.per_class})

    def get(self, classes) -> dict[int, object]:
        return {c: self.per_class[str(c)] for c in classes if self._valid(c)}


# ----------------------------------------------------------------------------------------------------------------
# The evaluator



# ----------------------------------------------------------------------------------------------------------------
# The evaluator


class _Evaluator:
    def __init__(self, run, *, force, batch_size, num_workers, progress, zrf_seed, rt, insdel_steps,
                 test_limit=None):
        self.run, self.force, self.progress = run, force, progress
        self.test_limit = test_limit
        self._test = None
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
        """The run's test set, or its fixed random subset of ``test_limit`` images (seeded: the same every time)."""
        if self._test is None:
            test = self.run.data.test
            if self.test_limit is not None and self.test_limit < len(test):
                perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(_TEST_SUBSET_SEED))
                test = Subset(test, sorted(perm[:self.test_limit].tolist()))
            self._test = test
        return self._test

    def loader(self, dataset, shuffle=False):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def test_labels(self) -> torch.Tensor:
        if self._test_labels is None:
            self._test_labels = M.labels_of(self.test)
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
            self._wf = self.run.wrapped()
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

    def cache(self, metric: str, method: str, params: dict, force: bool | None = None) -> _Cache:
        stamps: dict = {}

        def stamp(c):
            key = None if method in ("original", "wfnet") else c
            if key not in stamps:
                stamps[key] = self.run.model_stamp(method, c)
            return stamps[key]

        if self.test_limit is not None:  # results on a subset never mix with results on another test set
            params = {**params, "test_images": len(self.test)}
        return _Cache(self.eval_dir / f"{metric}_{method}.json", params, self.force if force is None else force, stamp)

    # metrics ---------------------------------------------------------------------------------------------------
    def acc(self, method: str, classes: list[int]) -> dict[int, dict]:
        cache = self.cache("acc", method, {"metric": "acc"})
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
        cache = self.cache("zrf", method, {"metric": "zrf", "random_seed": self.zrf_seed})
        for c in self._bar(cache.missing(classes), f"ZRF {method}"):
            logits, _ = M.predict(self.forward_for(method, c), self.class_loader(c), self.device)
            rlogits = self.random_logits()[torch.as_tensor(self.class_indices(c))]
            cache.put(c, {"zrf": M.zrf_from_logits(logits, rlogits),
                          "zrf_bad_teaching": M.bad_teaching_from_logits(logits, rlogits),
                          "n": int(logits.shape[0])})
        return cache.get(classes)

    def rt(self, method: str, classes: list[int]) -> dict[int, dict]:
        cache = self.cache("rt", method, {"metric": "rt", **self.rt_params})
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
        cache = self.cache("insdel", "wfnet", {"metric": "insdel", "steps": steps})
        for c in self._bar(cache.missing(classes), "insertion/deletion"):
            cache.put(c, M.insertion_deletion(self.wf(), c, self.class_loader(c), steps, self.device))
        return cache.get(classes)


# ----------------------------------------------------------------------------------------------------------------
# Tables



# ----------------------------------------------------------------------------------------------------------------
# Tables


def _table1(ev: _Evaluator, methods, classes_of, dataset, backbone, max_epochs) -> dict:
    paper_rows = paper.table1_rows(dataset, backbone) or {}
    rows = []
    for method in methods:
        classes = classes_of[method]
        acc = ev.cache("acc", method, {"metric": "acc"}, force=False).get(classes)
        zrf = ev.cache("zrf", method, {"metric": "zrf", "random_seed": ev.zrf_seed}, force=False).get(classes)
        rt = ev.cache("rt", method, {"metric": "rt", **ev.rt_params}, force=False).get(classes)
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
    stamps = {m: {str(c): ev.run.model_stamp(m, c) for c in classes_of[m]} for m in methods}
    return {"dataset": dataset, "backbone": backbone, "num_classes": ev.run.num_classes,
            "paper_available": bool(paper_rows), "zrf_random_seed": ev.zrf_seed, "rt_params": ev.rt_params,
            "test_images": len(ev.test), "test_images_total": len(ev.run.data.test),
            "rows": rows, "stamps": stamps}



def _table2(ev: _Evaluator, methods, classes, dataset, backbone) -> dict:
    steps = M.gate_steps(ev.insdel_steps).tolist()
    res = ev.cache("insdel", "wfnet", {"metric": "insdel", "steps": steps}, force=False).get(classes) if "wfnet" in methods \
        else {}
    complete = len(res) == len(classes)
    row = {"method": "wfnet", "model": "WF-Net", "classes": classes,
           "insertion": _mean(v["insertion"]["auc"] for v in res.values()) if complete else None,
           "deletion": _mean(v["deletion"]["auc"] for v in res.values()) if complete else None,
           "per_class": {c: {"insertion": v["insertion"]["auc"], "deletion": v["deletion"]["auc"]}
                         for c, v in res.items()},
           "paper": paper.table2_row(dataset, backbone)}
    return {"dataset": dataset, "backbone": backbone, "paper_available": row["paper"] is not None,
            "steps": next(iter(res.values()))["insertion"]["steps"] if res else None, "rows": [row]}



# ----------------------------------------------------------------------------------------------------------------
# Entry point


def evaluate_run(run, *, metrics: Sequence[str] = METRICS, force: bool = False, rt_max_epochs: int = 100,
                 rt_samples_per_epoch: int = 500, rt_lr: float = 0.01, rt_batch_size: int = 64, rt_seed: int = 0,
                 insdel_steps: int | Sequence[float] = 21, zrf_seed: int = DEFAULT_ZRF_SEED, batch_size: int = 256,
                 num_workers: int = 0, methods: Sequence[str] | None = None, classes: Sequence[int] | None = None,
                 progress: bool = True, audit_options: dict | None = None, test_limit: int | None = None) -> dict:
    """Compute the requested metrics for every method of the run and write Tables 1 and 2 under ``run_dir/eval``.

    ``metrics``: any of "acc" (Acc_f / Acc_r), "zrf", "rt" (relearn time; needs the original's per-class accuracy,
    computed if missing), "insdel" (WF-Net only). ``methods`` defaults to "original", every baseline present and
    "wfnet"; ``classes`` to all (a baseline is evaluated on the classes it has, ``run.baseline_classes``).
    The tables always report whatever is cached (a metric not computed yet shows "n/a"). Returns
    ``{"table1": {...}, "table2": {...}}`` (the JSON written to table1.json / table2.json). A request of audit
    metrics only writes ``eval/audit.*`` and leaves Tables 1 / 2 untouched (their entries are then None).
    """
    unknown = sorted(set(metrics) - set(METRICS) - set(AUDIT_METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose among {list(METRICS + AUDIT_METRICS)}")
    if rt_max_epochs < 0:
        raise ValueError("rt_max_epochs must be >= 0")
    rt = {"max_epochs": int(rt_max_epochs), "samples_per_epoch": int(rt_samples_per_epoch), "lr": float(rt_lr),
          "batch_size": int(rt_batch_size), "seed": int(rt_seed)}
    if test_limit is not None and test_limit < 1:
        raise ValueError(f"test_limit must be >= 1, got {test_limit}")
    ev = _Evaluator(run, force=force, batch_size=batch_size, num_workers=num_workers, progress=progress,
                    zrf_seed=zrf_seed, rt=rt, insdel_steps=insdel_steps, test_limit=test_limit)
    all_classes = list(range(run.num_classes)) if classes is None else sorted({int(c) for c in classes})
    bad = [c for c in all_classes if not 0 <= c < run.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range: num_classes={run.num_classes}")
    baselines = list(run.baseline_methods())
    has_gates = run.model_stamp("wfnet") is not None
    root = Path(run.run_dir)
    if not has_gates and (methods is None or "wfnet" in methods):
        # results.md / untrain_summary.json still describe gates whose file is gone (deleted by hand): evaluating
        # without them would drop the WF-Net row silently while results.md still shows it
        left = [n for n in ("results.json", "results.md", "untrain_summary.json") if (root / n).exists()]
        if left:  # (no gates and no trace of them: a run not untrained yet evaluates what it has)
            raise ValueError(f"{root / 'filters.safetensors'} does not exist although {', '.join(left)} "
                             f"describe(s) its gates: recreate it with `wfnet untrain {root}` (the options are in "
                             f"results.json), or leave WF-Net out with --methods")
    if methods is None:  # WF-Net once the run has gates
        methods = ["original", *baselines] + (["wfnet"] if has_gates else [])
    methods = list(methods)
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

    out = {"table1": None, "table2": None, "markdown": ""}
    if any(m in METRICS for m in metrics):  # an audit-only request leaves Tables 1 / 2 as they are
        dataset, backbone = str(run.config.get("dataset", "?")), str(run.config.get("model", "?"))
        t1 = _table1(ev, methods, classes_of, dataset, backbone, rt["max_epochs"])
        t2 = _table2(ev, methods, all_classes, dataset, backbone)
        md = {"table1": table1_md(t1, run.run_dir), "table2": table2_md(t2, run.run_dir)}
        root = Path(run.run_dir)
        for name in ("table1", "table2"):
            files.write_json(files.staging_path(root, f"eval/{name}.json"), {"table1": t1, "table2": t2}[name])
            files.write_text(files.staging_path(root, f"eval/{name}.md"), md[name])
        files.commit(root, new=[f"eval/{n}.{ext}" for n in ("table1", "table2") for ext in ("json", "md")])
        out = {"table1": files.json_safe(t1), "table2": files.json_safe(t2), "markdown": md["table1"] + "\n" +
               md["table2"]}
    requested = [m for m in AUDIT_METRICS if m in metrics]
    if requested:
        result = audit_run(run, requested, methods, classes_of, progress=progress, force=force,
                           **(audit_options or {}))
        out["audit"] = result
        out["markdown"] += ("\n" if out["markdown"] else "") + result["markdown"]
    return out


def audit_run(run, metrics: Sequence[str], methods: Sequence[str], classes_of: dict, *, samples: int = 1000,
              shots: Sequence[int] = (10, 50), steps: int = 50, hard_threshold: float = 0.5,
              progress: bool = True, force: bool = False) -> dict:
    """The unlearning audit (:mod:`wfnet.audit`) of the run's models, written to ``eval/audit.{md,json}``.

    Cached like Tables 1 / 2: when ``eval/audit.json`` was computed with the same options (metrics, subjects,
    classes, samples, shots, steps, threshold) on models with the same stamps, it is returned as it is (``force``:
    recomputed); a rerun of ``wfnet demo`` then costs no audit.

    Subjects: the original (reference; no relearning attack), WF-Net run with row c, its hard export at
    ``hard_threshold``, and every baseline present ("retrain" is the reference a forgetting method is compared
    with). Classes: those every audited baseline has. The JSON names the stamps of the models it measured, so a
    reader can tell when it no longer describes the run's models.
    """
    from . import audit
    from .model import export

    data = run.data
    orig = run.original_model()
    subjects = [audit.AuditSubject("original", lambda c: (orig, lambda m, t: m(t)), skip={"relearn_fewshot"})]
    stamps = {"original": run.model_stamp("original")}
    if "wfnet" in methods:
        wf = run.wrapped()
        subjects.append(audit.AuditSubject("WF-Net (row c)", lambda c: (wf, lambda m, t, c=c: m(t, forget=c))))
        subjects.append(audit.AuditSubject(
            f"WF-Net hard export (T={hard_threshold:g})",
            lambda c: (export(wf, forget=c, hard=hard_threshold).eval(), lambda m, t: m(t))))
        stamps["wfnet"] = run.model_stamp("wfnet")
    baselines = [m for m in methods if m not in ("original", "wfnet")]
    for method in baselines:
        subjects.append(audit.AuditSubject(_label(method), lambda c, method=method: (run.baseline_model(method, c),
                                                                                      lambda m, t: m(t))))
    classes = sorted(set.intersection(*[set(classes_of[m]) for m in methods if classes_of.get(m)]))
    if not classes:
        raise ValueError("the audit needs classes that every audited model has; run the baselines on common "
                         "classes or choose --methods")
    for method in baselines:
        stamps[method] = {c: run.model_stamp(method, c) for c in classes}
    options = {"metrics": list(metrics), "methods": list(methods), "samples": int(samples),
               "shots": [int(k) for k in shots], "steps": int(steps)}
    root = Path(run.run_dir)
    cached = root / "eval" / "audit.json"
    if not force and cached.exists() and (root / "eval" / "audit.md").exists():
        old = files.read_json(cached)
        # JSON turns the int class keys of the baselines' stamps into strings: compare through the same round trip
        if (old.get("options") == options and old.get("classes") == classes
                and old.get("hard_threshold") == hard_threshold
                and old.get("stamps") == json.loads(json.dumps(files.json_safe(stamps)))):
            return {**old, "markdown": (root / "eval" / "audit.md").read_text(encoding="utf-8")}
    result = audit.run_audit(subjects, data.train, data.val, data.test, classes, run.device, metrics=metrics,
                             shots=tuple(shots), steps=steps, max_samples=samples, progress=progress)
    title = f"Audit: {run.config.get('dataset', '?')} / {run.config.get('model', '?')}"
    md = audit.audit_markdown(result, title)
    payload = {**result, "stamps": stamps, "hard_threshold": hard_threshold, "options": options}
    files.write_json(files.staging_path(root, "eval/audit.json"), files.json_safe(payload))
    files.write_text(files.staging_path(root, "eval/audit.md"), md)
    files.commit(root, new=["eval/audit.json", "eval/audit.md"])
    return {**files.json_safe(payload), "markdown": md}


