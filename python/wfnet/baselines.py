"""The unlearning baselines the paper compares against, each run once PER CLASS (the cost WF-Net avoids).

* ``retrain``: a model trained from scratch on the training set without class c (same recipe as the original).
* ``random-labels``: fine-tune the original on the full training set where every class-c sample gets a random label
  among the other classes (redrawn each time it is seen); SGD, lr ``lr``, ``epochs`` passes.
* ``negative-gradients``: fine-tune the original with gradient ASCENT on class-c samples, balanced by descent on an
  equal number of other samples in the same step (without it the ascent destroys every class); it stops as soon as
  the model's accuracy on the class-c validation samples reaches 0, or after ``epochs`` passes over class c.

``max_steps`` caps the optimizer steps of random-labels / negative-gradients per class (small machines).

Each method's models go to ``<run>/baselines/<method>/class_<c>.safetensors`` and the seconds per class and in total
to ``summary.json``: comparing that total with one untraining round is the point of the method.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .config import BASELINE_METHODS as METHODS
from .config import BaselineConfig, TrainConfig
from .data import labels_of
from .metrics import accuracy
from .train import drop_single_last, train_classifier

__all__ = ["BaselineConfig", "unlearn_baseline", "METHODS"]


def _random_labels(original, train_ds, c, num_classes, cfg, device, progress):
    model = copy.deepcopy(original).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + c)
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
    g = torch.Generator().manual_seed(cfg.seed * 1000 + c)
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


def unlearn_baseline(method: str, original: nn.Module, bundle, c: int, cfg: BaselineConfig, device,
                     build_fresh=None, train_cfg: TrainConfig | None = None, progress: bool = True) -> tuple[nn.Module, float]:
    """Run baseline ``method`` for class ``c``; returns (the unlearned model, seconds it took)."""
    t0 = time.time()
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



