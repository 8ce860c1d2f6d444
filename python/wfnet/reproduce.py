"""``wfnet reproduce``: the paper's Tables 1 and 2 per backbone, in one command, beside the paper's rows.

For every backbone: train -> untrain (tuned recipe; also the paper recipe, in a sibling folder, for the backbones of
``paper_recipe_for``) -> baselines -> evaluate -> explain, each in its own run folder ``OUT/<backbone>``. Every stage
is a :class:`wfnet.Run` method, so a finished stage is skipped (the run folder says it is done with these options)
and an interrupted one resumes from its state file. Then one combined Table 1 / Table 2 (markdown + JSON) with the
paper's rows beside ours, a figure (Acc_r / Acc_f of every model, ours vs the paper's) and the wall time of every
stage, in ``OUT/``.

Profiles (the settings are written into the report):

* ``paper``: the paper's settings: the full training set, full training, every baseline for every class, RT up to
  100 epochs. Meant for a GPU.
* ``cpu``: what 2 CPU cores allow, chosen from the measurements of docs/results/calibration_mnist_cpu.md: training
  subsets and recipes that reach the paper's original accuracies in minutes (one-cycle schedules, random shifts,
  bf16 autocast for the CNNs), cheaper stems / patches (**decisions**: VGG-16 with BatchNorm, ResNet-18 with a
  stride-2 3x3 stem, ViTs with 7-px patches: 16 tokens at 28 px), untraining capped in steps, the baselines for a
  documented subset of classes (retrain: class 0 of the CNNs; random labels: class 0; negative gradients: all) with
  capped steps, Table 1 on a fixed 2,000-image subset of the test set (the original's accuracy and the untraining's
  own per-class results use the full test set), RT capped at 10 epochs, 11-point insertion / deletion curves.

* ``demo`` / ``demo-quick``: ``wfnet demo`` (``--quick``): the small CNN on the embedded digits, every stage, with the
  unlearning audit (not in the quick one), in one run folder (:func:`run_backbone` without the combined report).
* ``audit`` (MNIST) / ``audit-digits`` (the embedded digits): the small CNN, every baseline (SSD included) for a few
  classes, Table 1 without RT / insertion-deletion, the full unlearning audit (retain-only relearning included) on
  those classes, no explanations: the audit of docs/results/audit_seeds.md, meant for ``--seeds``.

Seeds (``--seeds 0 1 2``): every backbone runs once per seed in ``OUT/seed_<s>/`` (its own combined report there),
with the seed in every stage's options (training: initialisation and data order; untraining: data order and rows;
baselines: data order, random labels; RT samples; the audit's draws and attacks); then ``OUT/seeds.{md,json}``
holds the mean and the standard deviation over the seeds of Acc_r, Acc_f, ZRF and every audit metric, per backbone
and model (:func:`seeds_summary`; sample standard deviation, ddof 1).

``PROFILES[profile][backbone]`` holds, per backbone: ``model`` (the architecture trained), ``data`` (DataConfig
fields), ``train`` (TrainConfig), ``untrain`` (UntrainConfig over the tuned / paper recipe), ``baselines`` (method
-> classes, None = all), ``baseline_options`` (BaselineConfig), ``eval`` (EvalConfig) and, optionally, ``audit``
(AuditConfig: the audit runs after the evaluation). Each backbone's stage
times go to ``OUT/timing/<backbone>.json``, so backbones can run in separate processes on the same OUT; the combined
report covers every backbone found in OUT.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import baselines, evaluate, explain, files, train, untrain
from .audit import AUDIT_METRICS, AuditConfig
from .baselines import BaselineConfig
from .checkpoint import read_state_meta
from .config import DataConfig, opt, opt_list, with_defaults
from .evaluate import EvalConfig
from .explain import ExplainConfig
from .run import Run, differences
from .train import TrainConfig

__all__ = ["PROFILES", "BACKBONES", "ReproduceConfig", "run", "run_backbone", "combined_tables", "made_otherwise",
           "seeded", "seeds_summary"]

BACKBONES = ("vgg16", "resnet18", "vit_tiny", "vit_small")

_CNN_TRAIN = dict(epochs=2, batch_size=128, optimizer="sgd", weight_decay=5e-4, schedule="onecycle", shift=2,
                  amp="bf16")
# ViT-T at patch 7: 54k x 2 epochs with shift +-1 96.23 %, 4 epochs without 97.22 %, 6 epochs 97.61 % (calibration,
# about +0.2 points per epoch): 10 epochs, compiled (1.3x faster ViT-T steps on this CPU; no gain for ViT-S).
_VIT_TRAIN = dict(batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="onecycle", warmup=0.1,
                  shift=0)
_CPU_EVAL = {"test_limit": 2000, "rt_max_epochs": 10, "insdel_steps": 11}
PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        "vgg16": {"model": "vgg16_bn",
                  "data": {"train_limit": 22_222},  # 20,000 train + 2,222 validation images
                  "train": {**_CNN_TRAIN, "lr": 0.05, "warmup": 0.2},
                  "untrain": {"max_epochs": 1, "max_steps": 80, "val_per_epoch": 4, "amp": "bf16"},
                  "baselines": {"retrain": [0], "random-labels": [0], "negative-gradients": None},
                  "baseline_options": {"max_steps": 60},
                  "eval": _CPU_EVAL},
        "resnet18": {"model": "resnet18",
                     "data": {"train_limit": 33_334, "stem_stride": 2},  # 30,000 train + 3,334 validation
                     "train": {**_CNN_TRAIN, "lr": 0.1, "warmup": 0.15},
                     "untrain": {"max_epochs": 1, "max_steps": 100, "val_per_epoch": 4, "amp": "bf16"},
                     "baselines": {"retrain": [0], "random-labels": [0], "negative-gradients": None},
                     "baseline_options": {"max_steps": 60},
                     "eval": _CPU_EVAL},
        "vit_tiny": {"model": "vit_tiny",
                     "data": {"train_limit": None, "patch_size": 7},  # 54,000 train + 6,000 validation
                     "train": {**_VIT_TRAIN, "epochs": 10, "compile": True},
                     # 300 steps: both bars on the full test set (200 steps with lambda_retain 200: drop 1.84)
                     "untrain": {"max_epochs": 1, "max_steps": 300, "val_per_epoch": 4},
                     "baselines": {"random-labels": [0], "negative-gradients": None},
                     "baseline_options": {"max_steps": 60},
                     "eval": _CPU_EVAL},
        # ViT-S costs 3.5x ViT-T per image (33 vs 131 training images/s on one core of this CPU, compiled ViT-T).
        # Learning-rate probe (2 epochs, full test set): 1e-3 93.50 %, 5e-4 96.16 %, 3e-4 96.03 %. bf16 autocast
        # trains it 1.4x faster here (103 vs 73 images/s on 2 threads, avx512_bf16): 8 epochs at 5e-4 in 79 min gave
        # 97.99 % (one test image short of 98.0); 10 epochs (99 min) gave 97.97 %: more epochs alone do not close it;
        # 10 epochs with random +-1 pixel shifts (the augmentation the CNNs use) gave 98.82 % (102 min of both cores).
        # Baselines for class 0 only, Table 1 on 1,000 images, RT cap 5.
        "vit_small": {"model": "vit_small",
                      "data": {"train_limit": None, "patch_size": 7},
                      "train": {**_VIT_TRAIN, "lr": 5e-4, "epochs": 10, "shift": 1, "amp": "bf16"},
                      "untrain": {"max_epochs": 1, "max_steps": 300, "val_per_epoch": 4},
                      "baselines": {"random-labels": [0], "negative-gradients": [0]},
                      "baseline_options": {"max_steps": 60},
                      "eval": {**_CPU_EVAL, "test_limit": 1000, "rt_max_epochs": 5}},
    },
    "paper": {b: {"model": b, "data": {"train_limit": None}, "train": {},
                  "untrain": {"max_epochs": 50},
                  "baselines": {"retrain": None, "random-labels": None, "negative-gradients": None},
                  "baseline_options": {},
                  "eval": {"rt_max_epochs": 100}}
              for b in BACKBONES},
}
# Plain VGG-16 does not train from scratch in a few epochs; its BatchNorm variant does (calibration, section 2).
PROFILES["paper"]["vgg16"]["model"] = "vgg16_bn"
# `wfnet demo`: the whole job on the embedded digits in a few CPU minutes; the audit uses a smaller protocol than the
# default (one k, 30 steps). `wfnet demo --quick`: fewer epochs, no baselines, no audit, RT cap 20.
PROFILES["demo"] = {"small_cnn": {"model": "small_cnn", "data": {}, "train": {"epochs": 15, "batch_size": 64},
                                  "untrain": {"max_epochs": 20},
                                  "baselines": {"random-labels": None, "negative-gradients": None},
                                  "baseline_options": {}, "eval": {"rt_max_epochs": 100},
                                  "audit": {"audit_samples": 500, "audit_shots": [10], "audit_steps": 30},
                                  # the demo's audit predates relearn_retain; kept to its three metrics (demo time)
                                  "audit_metrics": ["mia", "probe", "relearn_fewshot"]}}
PROFILES["demo-quick"] = {"small_cnn": {"model": "small_cnn", "data": {}, "train": {"epochs": 8, "batch_size": 64},
                                        "untrain": {"max_epochs": 8}, "baselines": {}, "baseline_options": {},
                                        "eval": {"rt_max_epochs": 20}}}
# The audit across seeds (docs/results/audit_seeds.md): every baseline for the audited classes only, the full audit.
# SSD's alpha from the digits sweep (docs/results/ssd_sweep_digits.md): the authors' 10 dampens a third of the small
# CNN's weights and leaves Acc_r at 34 %, 50 is the smallest grid value that keeps Acc_r near 90 % with Acc_f 0.
_AUDIT_AUDIT = {"audit_samples": 500, "audit_shots": [10], "audit_steps": 30}
PROFILES["audit"] = {"small_cnn": {"model": "small_cnn", "data": {"train_limit": 10_000}, "train": {"epochs": 2},
                                   "untrain": {"max_epochs": 1},
                                   "baselines": {m: [0, 1] for m in ("retrain", "random-labels", "negative-gradients",
                                                                     "ssd")},
                                   "baseline_options": {"ssd_alpha": 50.0},
                                   "eval": {"metrics": ["acc", "zrf"], "test_limit": 2000},
                                   "audit": _AUDIT_AUDIT, "explain": False}}
PROFILES["audit-digits"] = {"small_cnn": {**PROFILES["audit"]["small_cnn"], "data": {},
                                          "train": {"epochs": 15, "batch_size": 64}, "untrain": {"max_epochs": 20},
                                          "baselines": {m: [0, 1, 2] for m in ("retrain", "random-labels",
                                                                               "negative-gradients", "ssd")},
                                          "eval": {"metrics": ["acc", "zrf"]}}}


_PROFILE_MODELS = tuple(dict.fromkeys(m for prof in PROFILES.values() for m in prof))  # every profile's backbones


@dataclass
class ReproduceConfig:
    """``wfnet reproduce``: which backbones, on which data, under which profile, into which folder."""
    out: str = opt("runs/reproduce", "folder for one run folder per backbone and the combined report")
    dataset: str = opt("mnist", "mnist, cifar10, imagenet, ...")
    data_root: str | None = opt(None, "folder holding the dataset (default: $WFNET_DATA_ROOT)")
    models: list[str] | None = opt_list(f"comma-separated subset of {','.join(BACKBONES)} (default: all; small_cnn "
                                        f"for the demo / audit profiles)", _PROFILE_MODELS)
    profile: str = opt("cpu", "cpu: what 2 CPU cores allow (subsets, few epochs, baselines for a few classes; "
                              "written into the report); paper: the paper's settings; audit / audit-digits: the "
                              "small CNN on MNIST / the digits with every baseline and the full audit on a few "
                              "classes (--models small_cnn; for --seeds)",
                       choices=("cpu", "paper", "audit", "audit-digits"))
    seeds: list[int] | None = opt_list("run every backbone once per seed, in OUT/seed_<s>/, and report the mean and "
                                       "standard deviation over the seeds in OUT/seeds.md (default: once, seed 0, "
                                       "in OUT/)")
    paper_recipe_for: list[str] = field(default_factory=lambda: ["resnet18", "vit_tiny"],
                                        metadata={"help": "backbones also untrained with the paper recipe",
                                                  "flag": False})


_REDO = "redo"  # timing-file key: stages to recompute in full after a forced replacement (not a stage time)


def _stage(times: dict, name: str, fn):
    """Run one stage and add its wall time to ``times[name]``: the seconds spent in the stage over every invocation
    that finished it (a finished stage that is skipped adds only the check). A killed invocation writes nothing:
    training and untraining add a killed process's time from their state files (``_killed_seconds``)."""
    t0 = time.time()
    out = fn()
    times[name] = round(times.get(name, 0.0) + time.time() - t0, 1)
    return out


def _killed_seconds(state_path: Path, untrain: bool = False) -> float:
    """The wall time that killed processes spent in a training / untraining whose state file is about to be resumed:
    the state keeps it (up to its last checkpoint); 0 without a state file."""
    if not state_path.exists():
        return 0.0
    meta = read_state_meta(state_path)
    return float((meta.get("state", {}) if untrain else meta).get("seconds", 0.0))


def _paper_recipe_folder(run_dir: Path) -> Path:
    """A sibling run folder holding the same original model, for the paper recipe's gates."""
    sib = run_dir.with_name(run_dir.name + "-paper-recipe")
    if not (sib / "original.safetensors").exists():
        sib.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "original.safetensors"):
            shutil.copy2(run_dir / name, sib / name)
    return sib


def run_backbone(run_dir, p: dict, dataset: str, *, device=None, data_root: str | None = None,
                 paper_recipe: bool = False, progress: bool = True, force: bool = False, log=print,
                 timing_file: Path | None = None) -> dict:
    """Every stage for one profile entry ``p`` (see the module docstring) in the run folder ``run_dir``: train ->
    untrain (-> the paper recipe in a sibling folder) -> baselines -> evaluate (-> audit) -> explain. A finished
    stage is skipped, an interrupted one resumed. Each stage's wall time is added to ``timing_file`` (when given).
    Returns ``{"run", "untrain", "evaluate", "audit", "explain"}`` (each stage's result)."""
    run_dir = Path(run_dir)
    times = files.read_json(timing_file) if timing_file is not None and timing_file.exists() else {}
    data = DataConfig(model=p["model"], dataset=dataset, data_root=data_root, **p["data"])
    results = {}

    def save_times():
        if timing_file is None:
            return
        times["total"] = round(sum(v for k, v in times.items() if k not in ("total", _REDO)), 1)
        timing_file.parent.mkdir(exist_ok=True)
        files.write_json(timing_file, times)

    def timed(name, fn):
        result = _stage(times, name, fn)
        if name in times.get(_REDO, []):
            times[_REDO].remove(name)
            if not times[_REDO]:
                del times[_REDO]
        save_times()
        return result

    def replacing(stages, redo=("evaluate", "explain")):
        """Before a forced replacement: the stages' old times go, and evaluate / explain are redone in full
        (remembered in the timing file, so an interrupted rerun still redoes them)."""
        for name in stages:
            times.pop(name, None)
        times[_REDO] = sorted({*times.get(_REDO, []), *redo})
        for name in redo:
            times.pop(name, None)
        save_times()

    train_state = run_dir / "train_state.safetensors"
    times["train"] = round(times.get("train", 0.0) + _killed_seconds(train_state), 1)
    run = timed("train", lambda: train.run(Run.create(run_dir, data, device=device, log=log),
                                           TrainConfig(**p["train"]), resume=train_state.exists(),
                                           progress=progress))
    results["run"] = run
    cfg = untrain.config_for(run, **p["untrain"])
    if force and untrain.saved_options(run) not in (None, untrain.options_key(cfg)):
        replacing(["untrain"])
    untrain_state = run_dir / "untrain_state.safetensors"
    times["untrain"] = round(times.get("untrain", 0.0) + _killed_seconds(untrain_state, untrain=True), 1)
    results["untrain"] = timed("untrain", lambda: untrain.run(run, cfg, force=force, progress=progress,
                                                              resume=untrain_state.exists()))
    if paper_recipe:
        sib = Run.open(_paper_recipe_folder(run_dir), device=device, data_root=data_root, log=log)
        sib_cfg = untrain.config_for(sib, recipe="paper", **p["untrain"])
        if force and untrain.saved_options(sib) not in (None, untrain.options_key(sib_cfg)):
            replacing(["untrain_paper_recipe"], redo=("evaluate_paper_recipe",))
        timed("untrain_paper_recipe", lambda: untrain.run(
            sib, sib_cfg, force=force, progress=progress,
            resume=(sib.run_dir / "untrain_state.safetensors").exists()))
        timed("evaluate_paper_recipe", lambda: evaluate.run(
            sib, EvalConfig(**{**p["eval"], "metrics": ["acc", "zrf"], "methods": ["wfnet"]}),
            force="evaluate_paper_recipe" in times.get(_REDO, []), progress=progress))
    for method, classes in p["baselines"].items():
        options = BaselineConfig(**p["baseline_options"], methods=[method], classes=classes)
        swap = force and baselines.made_otherwise(run, method, options)
        if swap:
            replacing([f"baseline_{method}"])
        timed(f"baseline_{method}", lambda: baselines.run(run, options, force=swap, progress=progress))
    results["evaluate"] = timed("evaluate", lambda: evaluate.run(
        run, EvalConfig(**p["eval"]), force="evaluate" in times.get(_REDO, []), progress=progress))
    if "audit" in p:
        results["audit"] = timed("audit", lambda: evaluate.run(
            run, EvalConfig(**{**p["eval"], "metrics": list(p.get("audit_metrics", AUDIT_METRICS))},
                            audit=AuditConfig(**p["audit"])),
            force="audit" in times.get(_REDO, []), progress=progress)["audit"])
    if not p.get("explain", True):
        return results
    results["explain"] = timed("explain", lambda: explain.run(
        run, ExplainConfig(insdel_steps=p["eval"].get("insdel_steps", 21), test_limit=p["eval"].get("test_limit")),
        force="explain" in times.get(_REDO, []), progress=progress))
    return results


def run(cfg: ReproduceConfig | None = None, *, device=None, progress: bool = True, force: bool = False,
        log=print) -> dict:
    """The ``reproduce`` stage: every stage for every backbone of ``cfg.models`` under ``cfg.out``
    (:func:`run_backbone`, one run folder per backbone) and the combined report.

    A stage already done with the same options is skipped. Gates or baseline models made with other options (an
    edited profile) are refused with the differences named, or with ``force`` replaced (the old ones stay until
    the new ones are made); the evaluation and the explanation are then recomputed in full, and the wall times
    of every replaced stage start again from zero."""
    cfg = cfg or ReproduceConfig()
    profile, models = cfg.profile, list(cfg.models or BACKBONES)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    unknown = [m for m in models if m not in PROFILES[profile]]
    if unknown:
        raise ValueError(f"no {profile} profile for {unknown}: choose among {', '.join(PROFILES[profile])}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = None if cfg.seeds is None else [int(s) for s in cfg.seeds]
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise ValueError(f"--seeds needs distinct seeds >= 0, got {cfg.seeds}")
    reports = {}
    for seed in seeds or [None]:
        folder = out if seed is None else out / f"seed_{seed}"
        for model in models:
            p = seeded(PROFILES[profile][model], seed)
            log(f"== {model} ({p['model']}, {profile} profile{'' if seed is None else f', seed {seed}'}) in "
                f"{folder / model}")
            run_backbone(folder / model, p, cfg.dataset, device=device, data_root=cfg.data_root,
                         paper_recipe=model in cfg.paper_recipe_for, progress=progress, force=force, log=log,
                         timing_file=folder / "timing" / f"{model}.json")
        # also other processes' runs
        found = [m for m in PROFILES[profile] if (folder / "timing" / f"{m}.json").exists()]
        timing = {m: files.read_json(folder / "timing" / f"{m}.json") for m in found}
        reports[seed] = combined_tables(folder, cfg.dataset, found, profile, timing, seed=seed)
    if seeds is None:
        log(reports[None]["markdown"])
        return reports[None]
    summary = seeds_summary(out, seeds, models, cfg.dataset, profile)
    log(summary["markdown"])
    return {**summary, "per_seed": reports}


def seeded(p: dict, seed: int | None) -> dict:
    """Profile entry ``p`` with ``seed`` in every stage's options (None: ``p`` as it is, every seed its default)."""
    if seed is None:
        return p
    p = copy.deepcopy(p)
    for stage, key in (("train", "seed"), ("untrain", "seed"), ("baseline_options", "seed"), ("eval", "rt_seed"),
                       ("audit", "audit_seed")):
        if stage in p:
            p[stage][key] = int(seed)
    return p


def _mean_std(values: list) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values), "values": values}


def seeds_summary(out, seeds, models, dataset: str, profile: str) -> dict:
    """Mean and standard deviation over ``seeds`` (sample std, ddof 1) of Acc_r, Acc_f, ZRF (Table 1, per model)
    and of every audit metric (per audited model), from ``OUT/seed_<s>/<backbone>/eval/``; written to
    ``OUT/seeds.{md,json}``. A value missing for a seed (e.g. no audit) is left out of that cell's ``n``."""
    out = Path(out)
    table: dict = {}   # backbone -> model label -> metric -> [values per seed]
    audit_classes: dict = {}
    for model in models:
        rows: dict = {}
        for seed in seeds:
            ev = out / f"seed_{seed}" / model / "eval"
            if (ev / "table1.json").exists():
                for r in json.loads((ev / "table1.json").read_text())["rows"]:
                    cell = rows.setdefault(r["model"], {})
                    for k in ("acc_r", "acc_f", "zrf"):
                        cell.setdefault(k, []).append(r.get(k))
            if (ev / "audit.json").exists():
                audit = json.loads((ev / "audit.json").read_text())
                audit_classes[model] = audit["classes"]
                for name, res in audit["mean"].items():
                    # the served WF-Net is Table 1's "WF-Net" row; baselines carry the same label in both
                    cell = rows.setdefault("WF-Net" if name == "WF-Net (row c)" else name, {})
                    for k, v in res.items():
                        cell.setdefault(k, []).append(v)
        table[model] = {name: {k: _mean_std(v) for k, v in cell.items()} for name, cell in rows.items()}
    cols = []
    for rows in table.values():
        for cell in rows.values():
            cols += [k for k in cell if k not in cols]
    names = {"acc_r": "Acc_r (%)", "acc_f": "Acc_f (%)", "zrf": "ZRF", "mia": "MIA eff. (up)",
             "probe": "probe on c (down)", "relearn_retain": "Acc_f after retain-only FT (down)"}

    def fmt(v):
        if v is None:
            return "-"
        return f"{v['mean']:.3f}" + (f" ± {v['std']:.3f}" if v["std"] is not None else "") + \
            (f" (n={v['n']})" if v["n"] != len(seeds) else "")

    md = [f"# Mean ± std over seeds {list(seeds)}: {dataset}, {profile} profile", "",
          "Acc_r / Acc_f in %, means over each model's classes (Table 1); ZRF in [0, 1]; audit metrics in [0, 1], "
          "means over the audited classes. Sample standard deviation (ddof 1) over the seeds; (n=k) where a value "
          "exists for k seeds only.", ""]
    for model, rows in table.items():
        md += [f"## {model}" + (f" (audited classes {audit_classes[model]})" if model in audit_classes else ""), "",
               "| model | " + " | ".join(names.get(c, c.replace("relearn_", "Acc_f after ") + " (down)")
                                       for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for name, cell in rows.items():
            md.append(f"| {name} | " + " | ".join(fmt(cell.get(c)) for c in cols) + " |")
        md.append("")
    md += [f"Per seed: `seed_<s>/combined.md` and `seed_<s>/<backbone>/eval/` (Table 1, audit.md). Settings of the "
           f"`{profile}` profile (every stage's seed set to s):", "", "```json",
           json.dumps({m: PROFILES[profile][m] for m in models}, indent=1), "```"]
    text = "\n".join(md) + "\n"
    payload = {"dataset": dataset, "profile": profile, "seeds": list(seeds), "audit_classes": audit_classes,
               "table": table, "settings": {m: PROFILES[profile][m] for m in models}}
    files.write_json(out / "seeds.json", files.json_safe(payload))
    files.write_text(out / "seeds.md", text)
    return {**payload, "markdown": text}


def _row_values(row: dict | None) -> dict:
    if not row:
        return {}
    return {k: row.get(k) for k in ("acc_r", "acc_f", "zrf", "rt")}


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def made_otherwise(out, model: str, profile: str, seed: int | None = None) -> list[str]:
    """What in ``OUT/<model>`` (and its paper-recipe sibling) was made with other settings than the profile's now
    (training, untraining, baselines; with ``seed``: the profile's under that seed, :func:`seeded`):
    ``name: old -> new`` per difference; empty when the folder matches."""
    p = seeded(PROFILES[profile][model], seed)
    run_dir = Path(out) / model
    if not (run_dir / "original.safetensors").exists():
        return []
    run = Run.open(run_dir, log=lambda m: None)
    found = []
    saved_train = with_defaults(TrainConfig, run.config.get("train") or {})
    if saved_train != asdict(TrainConfig(**p["train"])):
        found.append(f"train ({differences(saved_train, asdict(TrainConfig(**p['train'])))})")
    for folder, name in ((run_dir, "tuned"), (run_dir.with_name(run_dir.name + "-paper-recipe"), "paper")):
        if not (folder / "filters.safetensors").exists():
            continue
        r = run if folder == run_dir else Run.open(folder, log=lambda m: None)
        key = untrain.options_key(untrain.config_for(r, recipe=name, **p["untrain"]))
        if untrain.saved_options(r) != key:
            found.append(f"untrain, {name} recipe ({differences(untrain.saved_options(r), key)})")
    options = BaselineConfig(**p["baseline_options"])
    for method in p["baselines"]:
        if baselines.made_otherwise(run, method, options):
            found.append(f"baseline {method}")
    return found


def combined_tables(out, dataset: str, models, profile: str, timing: dict | None = None,
                    seed: int | None = None) -> dict:
    """The combined Table 1 / Table 2 (ours beside the paper's) and the figure, from each backbone's ``eval/``.
    A backbone whose folder was made with other settings than the profile's (under ``seed``) is named at the top of
    the report."""
    out = Path(out)
    stale = {m: d for m in models if (d := made_otherwise(out, m, profile, seed))}
    t1_rows, t2_rows = [], []
    for model in models:
        for folder, recipe in ((out / model, "tuned"), (out / f"{model}-paper-recipe", "paper")):
            t1 = folder / "eval" / "table1.json"
            if not t1.exists():
                continue
            table = json.loads(t1.read_text())
            for row in table["rows"]:
                if recipe == "paper" and row["method"] != "wfnet":
                    continue
                classes = row["classes"]
                t1_rows.append({"backbone": model, "method": row["method"], "model": row["model"], "recipe": recipe,
                                "classes": classes, "acc_r": row["acc_r"], "acc_f": row["acc_f"], "zrf": row["zrf"],
                                "rt": row.get("rt"), "paper": _row_values(row.get("paper"))})
            t2 = folder / "eval" / "table2.json"
            if recipe == "tuned" and t2.exists():
                for row in json.loads(t2.read_text())["rows"]:
                    t2_rows.append({"backbone": model, "insertion": row["insertion"], "deletion": row["deletion"],
                                    "paper": row.get("paper")})
    md = []
    if stale:  # never let the settings printed below describe a folder that does not hold them
        md += ["**Made with other settings than the profile's below** (rerun `wfnet reproduce --force` for these "
               "backbones):", ""] + [f"- {m}: {'; '.join(d)}" for m, d in stale.items()] + [""]
    md += [f"# Table 1: {dataset}, ours beside the paper's ({profile} profile)", "",
          "| backbone | model | classes | Acc_r ours | Acc_r paper | Acc_f ours | Acc_f paper | ZRF ours | ZRF paper "
          "| RT ours | RT paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in t1_rows:
        name = r["model"] + (" (paper recipe)" if r["recipe"] == "paper" else "")
        n = len(r["classes"])
        p = r["paper"] if r["recipe"] == "tuned" or r["method"] == "wfnet" else {}
        md.append(f"| {r['backbone']} | {name} | {'all' if n >= 10 else r['classes']} | {_fmt(r['acc_r'])} | "
                  f"{_fmt(p.get('acc_r'))} | {_fmt(r['acc_f'])} | {_fmt(p.get('acc_f'))} | {_fmt(r['zrf'], True)} | "
                  f"{_fmt(p.get('zrf'), True)} | {r['rt'] or 'n/a'} | {_fmt(p.get('rt'))} |")
    md += ["", f"# Table 2: {dataset}, insertion / deletion of WF-Net", "",
           "| backbone | Ins ours | Ins paper | Del ours | Del paper |", "|---|---|---|---|---|"]
    for r in t2_rows:
        p = r["paper"] or {}
        md.append(f"| {r['backbone']} | {_fmt(r['insertion'])} | {_fmt(p.get('insertion'))} | "
                  f"{_fmt(r['deletion'])} | {_fmt(p.get('deletion'))} |")
    if timing:
        stages = [k for k in dict.fromkeys(k for t in timing.values() for k in t) if k not in ("total", _REDO)]
        stages.append("total")
        md += ["", "# Wall time per stage (s)", "", "| backbone | " + " | ".join(stages) + " |",
               "|---|" + "---|" * len(stages)]
        for model, t in timing.items():
            md.append(f"| {model} | " + " | ".join(str(t.get(s, "-")) for s in stages) + " |")
    md += ["", f"Settings of the `{profile}` profile per backbone:", "", "```json",
           json.dumps({m: PROFILES[profile][m] for m in models}, indent=1), "```"]
    text = "\n".join(md) + "\n"
    payload = {"dataset": dataset, "profile": profile, "settings": {m: PROFILES[profile][m] for m in models},
               "made_otherwise": stale,
               "table1": t1_rows, "table2": t2_rows, "timing": timing or {}}
    files.write_json(out / "combined.json", files.json_safe(payload))
    files.write_text(out / "combined.md", text)
    if t1_rows:
        _figure(t1_rows, out / "combined.png", dataset)
    return {**payload, "markdown": text}


def _figure(rows, path: Path, dataset: str) -> None:
    # matplotlib's object API (no pyplot): no display needed, the caller's backend left alone
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig = Figure(figsize=(4.2 * len(backbones), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(backbones), squeeze=False)
    for ax, bb in zip(axes[0], backbones):
        mine = [r for r in rows if r["backbone"] == bb]
        labels = [r["model"] + (" (paper rec.)" if r["recipe"] == "paper" else "") for r in mine]
        x = range(len(mine))
        w = 0.2
        for k, (key, color) in enumerate((("acc_r", "tab:blue"), ("acc_f", "tab:red"))):
            ours = [r[key] or 0 for r in mine]
            theirs = [(r["paper"] or {}).get(key) for r in mine]
            ax.bar([i + (2 * k - 1.5) * w for i in x], ours, w, color=color, label=f"{key} ours")
            ax.bar([i + (2 * k - 0.5) * w for i in x], [t or 0 for t in theirs], w, color=color, alpha=0.35,
                   hatch="//", label=f"{key} paper")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{bb} on {dataset}")
    axes[0][0].set_ylabel("accuracy (%)")
    # One legend above the panels: inside a panel it hides the bars of whichever model sits in its corner.
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
