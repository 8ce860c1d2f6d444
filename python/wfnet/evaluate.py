"""The ``evaluate`` stage: what ``wfnet evaluate`` computes and writes.

:func:`run` (options :class:`EvalConfig`) computes every metric of :mod:`wfnet.metrics` for the original model,
WF-Net and each baseline present in the run (insertion / deletion for WF-Net only; RT not for the original) and
writes Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion) as markdown and JSON under
``run_dir/eval/`` (rendered by :mod:`wfnet.report`), in one commit. The audit metrics (``mia``, ``probe``, ``relearn_fewshot``, ``relearn_retain``)
go to :func:`wfnet.audit.run` (``eval/audit.{md,json}``).

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import audit
from . import files
from . import metrics as M
from . import paper
from .baselines import METHODS as BASELINE_METHODS
from .config import opt, opt_list
from .audit import AUDIT_METRICS, AuditConfig
from .errors import RunError
from .report import mean as _mean
from .report import method_label as _label
from .report import table1_md, table2_md
from .run import FILTERS, Run

__all__ = ["EvalConfig", "run", "METRICS", "Evaluator"]

METRICS = ("acc", "zrf", "rt", "insdel")
_TEST_SUBSET_SEED = 2024  # the fixed subset of --test-limit (any fixed value)


@dataclass
class EvalConfig:
    """Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion): ``wfnet evaluate``."""
    metrics: list[str] | None = opt_list(f"comma-separated subset of {','.join(METRICS + AUDIT_METRICS)} (default: "
                                         f"{','.join(METRICS)}; the audit metrics {','.join(AUDIT_METRICS)} on request, "
                                         f"written to eval/audit.md)", METRICS + AUDIT_METRICS)
    methods: list[str] | None = opt_list("comma-separated subset of original, wfnet and the baselines present "
                                    "(default: all)")
    classes: list[int] | None = opt_list("comma-separated class ids (default: all)")
    test_limit: int | None = opt(None, "evaluate on a fixed random subset of this many test images (default: the "
                                       "whole test set; the tables say which)")
    rt_max_epochs: int = opt(100, "relearn-time cap in epochs ('never' beyond)")
    rt_samples: int = opt(500, "random training samples per relearn epoch")
    rt_lr: float = opt(0.01, "relearn SGD learning rate")
    rt_batch_size: int = opt(64, "relearn mini-batch size")
    rt_seed: int = opt(0, "seed of the relearn samples")
    insdel_steps: int = opt(21, "points on the insertion / deletion curves")
    zrf_seed: int = opt(12345, "seed of the random network ZRF compares against (**decision**: any fixed value, "
                               "distinct from the usual training seeds)")
    batch_size: int = opt(256, "evaluation batch size")
    num_workers: int = opt(0, "DataLoader worker processes", flag=False)
    audit: AuditConfig = field(default_factory=AuditConfig,
                               metadata={"help": "the unlearning audit's options (wfnet.audit)", "flag": False})

    def rt_params(self) -> dict:
        """The relearn-time protocol, as its cache records it."""
        return {"max_epochs": int(self.rt_max_epochs), "samples_per_epoch": int(self.rt_samples),
                "lr": float(self.rt_lr), "batch_size": int(self.rt_batch_size), "seed": int(self.rt_seed)}


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


class Evaluator:
    """The metrics of one run under one :class:`EvalConfig`, each read from or written to its cache."""

    def __init__(self, run: Run, cfg: EvalConfig, *, force: bool = False, progress: bool = True):
        self.run, self.cfg, self.force, self.progress = run, cfg, force, progress
        self.test_limit = cfg.test_limit
        self._test = None
        self.batch_size, self.num_workers = cfg.batch_size, cfg.num_workers
        self.zrf_seed, self.rt_params, self.insdel_steps = cfg.zrf_seed, cfg.rt_params(), cfg.insdel_steps
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
            raise RunError(f"the test set has no sample of class {c}")
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


def _table1(ev: Evaluator, methods, classes_of, dataset, backbone, max_epochs) -> dict:
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



def _table2(ev: Evaluator, methods, classes, dataset, backbone) -> dict:
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
# The stage


def _methods_and_classes(run: Run, methods, all_classes: list[int]) -> tuple[list[str], dict]:
    """The methods to evaluate (default: the original, every baseline present in table order, WF-Net once the run
    has gates) and the classes of each (a baseline: those it has models for). A run whose gates were deleted by
    hand while results still describe them is refused, never shown without its WF-Net row."""
    found = list(run.baseline_methods())
    baselines = [m for m in BASELINE_METHODS if m in found] + [m for m in found if m not in BASELINE_METHODS]
    has_gates = run.model_stamp("wfnet") is not None
    root = Path(run.run_dir)
    if not has_gates and (methods is None or "wfnet" in methods):
        # results.md / untrain_summary.json still describe gates whose file is gone (deleted by hand): evaluating
        # without them would drop the WF-Net row silently while results.md still shows it
        left = [n for n in ("results.json", "results.md", "untrain_summary.json") if (root / n).exists()]
        if left:
            raise RunError(f"{root / FILTERS} does not exist although {', '.join(left)} describe(s) its gates: "
                           f"recreate it with `wfnet untrain {root}` (the options are in results.json), or leave "
                           f"WF-Net out with --methods")
        if methods is not None:
            raise RunError(f"{root / FILTERS} does not exist: untrain first (`wfnet untrain {root}`), or leave "
                           f"WF-Net out of --methods")
    if methods is None:
        methods = ["original", *baselines] + (["wfnet"] if has_gates else [])
    methods = list(methods)
    for m in methods:
        if m not in ("original", "wfnet") and m not in baselines:
            raise RunError(f"method {m!r} is not in this run; it has original, wfnet and {baselines}")
    classes_of = {m: (all_classes if m in ("original", "wfnet")
                      else [c for c in all_classes if c in set(run.baseline_classes(m))]) for m in methods}
    return methods, classes_of


def run(run: Run, cfg: EvalConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
    """The ``evaluate`` stage: compute the requested metrics for every method of the run and write Tables 1 and 2
    under ``run_dir/eval``.

    ``cfg.metrics``: any of "acc" (Acc_f / Acc_r), "zrf", "rt" (relearn time; needs the original's per-class
    accuracy, computed if missing), "insdel" (WF-Net only), and the audit metrics. ``cfg.methods`` defaults to
    "original", every baseline present and "wfnet"; ``cfg.classes`` to all (a baseline is evaluated on the classes it
    has, ``run.baseline_classes``). The tables always report whatever is cached (a metric not computed yet shows
    "n/a"). Returns ``{"table1", "table2", "markdown"}`` (the JSON written to table1.json / table2.json), and
    ``"audit"`` when audit metrics were asked for. A request of audit metrics only writes ``eval/audit.*`` and
    leaves Tables 1 / 2 untouched (their entries are then None).
    """
    cfg = cfg or EvalConfig()
    metrics = tuple(cfg.metrics or METRICS)
    unknown = sorted(set(metrics) - set(METRICS) - set(AUDIT_METRICS))
    if unknown:
        raise RunError(f"unknown metric(s) {unknown}; choose among {list(METRICS + AUDIT_METRICS)}")
    if cfg.rt_max_epochs < 0:
        raise RunError("rt_max_epochs must be >= 0")
    if cfg.test_limit is not None and cfg.test_limit < 1:
        raise RunError(f"test_limit must be >= 1, got {cfg.test_limit}")
    ev = Evaluator(run, cfg, force=force, progress=progress)
    all_classes = list(range(run.num_classes)) if cfg.classes is None else sorted({int(c) for c in cfg.classes})
    bad = [c for c in all_classes if not 0 <= c < run.num_classes]
    if bad:
        raise RunError(f"classes {bad} are out of range: num_classes={run.num_classes}")
    methods, classes_of = _methods_and_classes(run, cfg.methods, all_classes)
    root = Path(run.run_dir)

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
        t1 = _table1(ev, methods, classes_of, dataset, backbone, cfg.rt_max_epochs)
        t2 = _table2(ev, methods, all_classes, dataset, backbone)
        md = {"table1": table1_md(t1, run.run_dir), "table2": table2_md(t2, run.run_dir)}
        for name in ("table1", "table2"):
            files.write_json(files.staging_path(root, f"eval/{name}.json"), {"table1": t1, "table2": t2}[name])
            files.write_text(files.staging_path(root, f"eval/{name}.md"), md[name])
        files.commit(root, new=[f"eval/{n}.{ext}" for n in ("table1", "table2") for ext in ("json", "md")])
        out = {"table1": files.json_safe(t1), "table2": files.json_safe(t2), "markdown": md["table1"] + "\n" +
               md["table2"]}
    requested = [m for m in AUDIT_METRICS if m in metrics]
    if requested:
        result = audit.run(run, cfg.audit, requested, methods, classes_of, force=force, progress=progress)
        out["audit"] = result
        out["markdown"] += ("\n" if out["markdown"] else "") + result["markdown"]
    return out
