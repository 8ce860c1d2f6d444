"""The unlearning baselines the paper compares against, each run once PER CLASS (the cost WF-Net avoids).

* ``retrain``: a model trained from scratch on the training set without class c (same recipe as the original).
* ``random-labels``: fine-tune the original on the full training set where every class-c sample gets a random label
  among the other classes (redrawn each time it is seen); SGD, lr ``lr``, ``epochs`` passes.
* ``negative-gradients``: fine-tune the original with gradient ASCENT on class-c samples, balanced by descent on an
  equal number of other samples in the same step (without it the ascent destroys every class); it stops as soon as
  the model's accuracy on the class-c validation samples reaches 0, or after ``epochs`` passes over class c.
* ``ssd``: Selective Synaptic Dampening (:mod:`wfnet.ssd`; Foster et al., AAAI 2024), no training: parameters much
  more important (diagonal Fisher) to class c than to the full training data are dampened. Hyper-parameters
  ``ssd_alpha`` (selection weighting, default 10) and ``ssd_lambda`` (dampening constant, default 1), the authors'
  defaults; the digits sweep is docs/results/ssd_sweep_digits.md. The full-data importances are computed once per
  invocation and shared by its classes; each class's ``seconds`` is what that class alone costs (the full-data pass
  included; ``full_importance_seconds`` and ``samples`` in its metadata say how it splits).

``max_steps`` caps the optimizer steps of random-labels / negative-gradients per class (small machines).

Each method's models go to ``<run>/baselines/<method>/class_<c>.safetensors`` and the seconds per class and in total
to ``summary.json``: comparing that total with one untraining round is the point of the method.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import files
from .checkpoint import save_model
from .config import opt, opt_list, with_defaults
from .data import labels_of
from .errors import RunError
from .metrics import accuracy
from .run import TABLES, Run, baseline_summary, differences, dir_options, new_stamp
from .seeds import derive_seed
from .ssd import SSD_ALPHA, SSD_LAMBDA, fisher_importance, ssd_unlearn
from .train import TrainConfig, drop_single_last, train_classifier

__all__ = ["BaselineConfig", "unlearn_baseline", "METHODS", "run", "made_with", "made_otherwise"]

METHODS = ("retrain", "random-labels", "negative-gradients", "ssd")  # the order of the tables


@dataclass
class BaselineConfig:
    """The per-class baselines (``wfnet baselines``); ``retrain`` uses the run's training options instead."""
    methods: list[str] | None = opt_list(f"comma-separated subset of {','.join(METHODS)} (default: all)", METHODS)
    classes: list[int] | None = opt_list("comma-separated class ids (default: all)")
    epochs: int = opt(1, "fine-tuning passes of random-labels / negative-gradients")
    lr: float = opt(0.01, "fine-tuning learning rate (SGD, momentum 0.9)")
    batch_size: int = opt(128, "fine-tuning mini-batch size")
    max_steps: int | None = opt(None, "random-labels / negative-gradients: optimizer steps at most per class "
                                      "(default: the full epochs)")
    seed: int = opt(0, "seed of the data order and of the random labels")
    ssd_alpha: float = opt(SSD_ALPHA, "ssd: selection weighting alpha (dampen parameters whose class-c importance "
                                      "exceeds alpha x their full-data importance)")
    ssd_lambda: float = opt(SSD_LAMBDA, "ssd: dampening constant lambda (a selected weight is multiplied by "
                                        "min(lambda x full-data / class-c importance, 1))")
    ssd_batch_size: int = opt(64, "ssd: mini-batch size of the importance passes (the batch-level Fisher depends "
                                  "on it)")


_WHICH = ("methods", "classes")  # which models to make, not how: not part of what a model was made with


def _own(method: str, options: dict) -> dict:
    """The options that decide ``method``'s models: without which methods / classes are asked for, and for ssd its
    ssd_* options only (no fine-tuning option changes an SSD model; no ssd_* option changes the fine-tuned ones)."""
    if method == "retrain":
        return dict(options)
    if method == "ssd":
        return {k: v for k, v in options.items() if k.startswith("ssd_")}
    return {k: v for k, v in options.items() if k not in _WHICH and not k.startswith("ssd_")}


def _random_labels(original, train_ds, c, num_classes, cfg, device, progress):
    model = copy.deepcopy(original).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "random-labels", c))
    steps = 0
    for epoch in range(cfg.epochs):
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                            drop_last=drop_single_last(len(train_ds), cfg.batch_size))  # BatchNorm: no batch of 1
        for x, y in tqdm(loader, desc=f"random-labels class {c}", leave=False, disable=not progress):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                return model.eval()
            steps += 1
            offset = torch.randint(1, num_classes, y.shape, generator=g)
            y = torch.where(y == c, (y + offset) % num_classes, y)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _negative_gradients(original, train_ds, val_ds, c, cfg, device, progress):
    model = copy.deepcopy(original).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    labels = labels_of(train_ds)
    forget = Subset(train_ds, (labels == c).nonzero().flatten().tolist())
    retain = Subset(train_ds, (labels != c).nonzero().flatten().tolist())
    val_labels = labels_of(val_ds)
    val_forget = DataLoader(Subset(val_ds, (val_labels == c).nonzero().flatten().tolist()), batch_size=512)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "negative-gradients", c))
    half = max(1, cfg.batch_size // 2)
    steps = 0
    for epoch in range(cfg.epochs):
        f_loader = DataLoader(forget, batch_size=half, shuffle=True, generator=g,
                              drop_last=drop_single_last(len(forget), half))  # BatchNorm: no batch of 1
        r_iter = iter(DataLoader(retain, batch_size=half, shuffle=True, generator=g,
                                 drop_last=drop_single_last(len(retain), half)))
        for xf, yf in tqdm(f_loader, desc=f"negative-gradients class {c}", leave=False, disable=not progress):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                return model.eval()
            steps += 1
            xr, yr = next(r_iter)
            loss = F.cross_entropy(model(xr.to(device)), yr.to(device)) \
                - F.cross_entropy(model(xf.to(device)), yf.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.eval()
            done = accuracy(model, val_forget, device) == 0.0
            model.train()
            if done:
                return model.eval()
    return model.eval()


def _ssd(original, train_ds, c, cfg, device, shared: dict, info: dict):
    if "full" not in shared:  # the full-data importances: once per invocation, for every class
        t0 = time.perf_counter()
        loader = DataLoader(train_ds, batch_size=cfg.ssd_batch_size)
        shared["full"] = fisher_importance(original.to(device), loader, device)
        shared["full_seconds"] = time.perf_counter() - t0
    full_imp, full_samples = shared["full"]
    labels = labels_of(train_ds)
    forget = Subset(train_ds, (labels == c).nonzero().flatten().tolist())
    if len(forget) == 0:
        raise RunError(f"ssd: the training set has no sample of class {c}")
    res = ssd_unlearn(original, DataLoader(forget, batch_size=cfg.ssd_batch_size), alpha=cfg.ssd_alpha,
                      lam=cfg.ssd_lambda, device=device, full_importance=full_imp)
    info.update(samples=res.samples + full_samples, forget_samples=res.samples, full_samples=full_samples,
                full_importance_seconds=shared["full_seconds"], dampened_fraction=res.fraction_dampened)
    return res.model, res.seconds + shared["full_seconds"]


def unlearn_baseline(method: str, original: nn.Module, bundle, c: int, cfg: BaselineConfig, device,
                     build_fresh=None, train_cfg: TrainConfig | None = None, progress: bool = True,
                     shared: dict | None = None, info: dict | None = None) -> tuple[nn.Module, float]:
    """Run baseline ``method`` for class ``c``; returns (the unlearned model, seconds it took).

    ``shared``: a dict kept across the classes of one invocation (ssd keeps its full-data importances there);
    ``info``: filled with what the method reports beyond seconds (ssd: samples, the full-data pass's seconds, the
    fraction of parameter elements dampened)."""
    t0 = time.time()
    if method == "ssd":
        model, seconds = _ssd(original, bundle.train, c, cfg, device, {} if shared is None else shared,
                              {} if info is None else info)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval(), seconds
    if method == "retrain":
        if build_fresh is None or train_cfg is None:
            raise ValueError("retrain needs build_fresh and train_cfg")
        labels = labels_of(bundle.train)
        train_wo = Subset(bundle.train, (labels != c).nonzero().flatten().tolist())
        model = build_fresh()
        train_classifier(model, train_wo, bundle.test, train_cfg, device, progress=progress, desc=f"retrain -{c}")
    elif method == "random-labels":
        model = _random_labels(original, bundle.train, c, bundle.num_classes, cfg, device, progress)
    elif method == "negative-gradients":
        model = _negative_gradients(original, bundle.train, bundle.val, c, cfg, device, progress)
    else:
        raise ValueError(f"unknown baseline {method!r}: use one of {', '.join(METHODS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), time.time() - t0


def made_with(run: Run, method: str, cfg: BaselineConfig) -> dict:
    """The options ``method``'s models are made with: the run's training options for retrain, else ``cfg``'s
    (without which methods and classes are asked for)."""
    if method == "retrain":
        return asdict(TrainConfig(**run.config["train"]))
    return _own(method, asdict(cfg))


def _saved(run: Run, method: str) -> dict | None:
    """The options ``method``'s models in the run were made with, completed with options added since."""
    saved = run.baseline_options(method)
    if saved is None:
        return None
    full = with_defaults(TrainConfig if method == "retrain" else BaselineConfig, saved)
    return _own(method, full) if method != "retrain" else {k: v for k, v in full.items() if k not in _WHICH}


def made_otherwise(run: Run, method: str, cfg: BaselineConfig) -> bool:
    """Whether ``method``'s models exist and were made with options other than ``cfg``'s."""
    return _saved(run, method) not in (None, made_with(run, method, cfg))


def run(run: Run, cfg: BaselineConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
    """The ``baselines`` stage: each of ``cfg.methods`` (default all) for each of ``cfg.classes`` (default all),
    one model per class; returns ``{method: summary}``.

    Models that exist with the same options are kept (``force``: recomputed). Models made with other options
    are replaced only with ``force``: the new ones go to ``baselines/.pending-<method>/`` (a rerun continues
    there) and replace the old folder in one step once every requested class is done."""
    cfg = cfg or BaselineConfig()
    methods = list(cfg.methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise RunError(f"unknown baseline(s) {bad}: use {', '.join(METHODS)}")
    classes = list(range(run.num_classes)) if cfg.classes is None else [int(c) for c in cfg.classes]
    out_of_range = [c for c in classes if not 0 <= c < run.num_classes]
    if out_of_range:
        raise RunError(f"class(es) {out_of_range} out of range: num_classes={run.num_classes}")
    tcfg = TrainConfig(**run.config["train"])
    root = run.run_dir
    for method in methods:  # check every method before running any
        old, new = _saved(run, method), made_with(run, method, cfg)
        if old is not None and old != new and not force:
            raise RunError(f"{run.baseline_dir(method)} holds {method} models made with other options "
                           f"({differences(old, new)}); pass --force to replace them (the old ones stay "
                           f"until the new ones are made)")
    original = run.original_model()
    stamp_original = run.original_info()["stamp"]
    summaries = {}
    shared: dict = {}  # across classes (ssd's full-data importances)
    for method in methods:
        new_opts = made_with(run, method, cfg)
        old = _saved(run, method)
        final = run.baseline_dir(method)
        pending = final.parent / f".pending-{method}"
        swap = old is not None and old != new_opts
        pending_opts = dir_options(pending) if pending.exists() else None
        if pending.exists() and (not swap or pending_opts is not None and
                                 _own(method, {k: v for k, v in pending_opts.items() if k not in _WHICH})
                                 != new_opts):
            run.discard(pending)  # an interrupted replacement with yet other options
        target = pending if swap else final
        for c in classes:
            path = target / f"class_{c}.safetensors"
            if path.exists() and not (force and not swap):
                continue
            info: dict = {}
            model, seconds = unlearn_baseline(method, original, run.data, c, cfg, run.device,
                                              build_fresh=lambda: run.build_model(seed=tcfg.seed),
                                              train_cfg=tcfg, progress=progress, shared=shared, info=info)
            meta = {"stamp": new_stamp(), "original_stamp": stamp_original, "method": method, "class": c,
                    "seconds": seconds, "options": new_opts, **info}
            if swap:  # not visible as a result until the whole folder is swapped in
                save_model(model, path, meta)
                files.write_json(target / "summary.json", baseline_summary(method, target))
            else:
                rel = str(path.relative_to(root))
                save_model(model, run.stage_path(rel), meta)
                files.write_json(run.stage_path(f"{rel}.summary"), baseline_summary(method, final, {c: meta}))
                run.commit(new={rel: str(run.stage_path(rel).relative_to(root)),
                                str((final / "summary.json").relative_to(root)):
                                    str(run.stage_path(f"{rel}.summary").relative_to(root))},
                           stale=TABLES)
            run.say(f"{method}: class {c} done in {seconds:.1f} s")
        if swap:
            run.replace_baselines(method, pending)
        summaries[method] = baseline_summary(method, final)
        run.say(f"{method}: {len(summaries[method]['seconds'])} classes, "
                f"{summaries[method]['total_seconds']:.0f} s in total")
    return summaries
