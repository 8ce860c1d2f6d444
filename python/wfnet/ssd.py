"""Selective Synaptic Dampening (SSD; Foster, Schoepf and Brintrup, "Fast Machine Unlearning Without Retraining
Through Selective Synaptic Dampening", AAAI 2024): a training-free unlearning baseline, run once per class.

1. Importances: the diagonal of the Fisher information of every parameter, estimated as in the authors' reference
   implementation (``calc_importance``): for each mini-batch, the squared gradient of the mean cross-entropy loss,
   averaged over the batches. ``I_D`` over the full training data (all classes, the forget class included), ``I_f``
   over the forget class's training samples.
2. Selection: every parameter element with ``I_f > alpha * I_D`` (``alpha``: the *selection weighting*; larger =
   fewer, more forget-specific elements).
3. Dampening: each selected element is multiplied by ``beta = min(lambda * I_D / I_f, 1)`` (``lambda``: the
   *dampening constant*; smaller = stronger dampening). Nothing else changes; no gradient step is taken.

The full-data importances do not depend on the forgotten class: :func:`fisher_importance` computes them once and
:func:`ssd_unlearn` takes them (``full_importance=``), so the cost of one more class is one pass over that class's
samples plus the dampening. :class:`SSDResult` reports the seconds and the samples that pass went through, and those
of the full-data pass separately.

**decision** (after the authors' code): importances are computed with the model in eval mode (BatchNorm running
statistics and dropout as served), over every parameter (weights, biases, normalisation affine);
``alpha = 10`` and ``lambda = 1`` are the authors' defaults for their image classifiers. The sweep over both on the
digits (``docs/results/ssd_sweep_digits.md``) records what they do on this project's small CNN.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SSD_ALPHA", "SSD_LAMBDA", "SSDResult", "fisher_importance", "ssd_dampen", "ssd_unlearn"]

SSD_ALPHA = 10.0   # selection weighting (the authors' default)
SSD_LAMBDA = 1.0   # dampening constant (the authors' default)


@dataclass
class SSDResult:
    """The dampened model and what it cost. ``seconds`` / ``samples``: the forget-class importance pass plus the
    dampening (the per-class cost); ``full_seconds`` / ``full_samples``: the full-data importance pass, 0 when the
    importances were handed in (computed once for all classes). ``dampened``: parameter elements changed, of
    ``total`` elements."""
    model: nn.Module
    seconds: float
    samples: int
    full_seconds: float
    full_samples: int
    dampened: int
    total: int
    alpha: float
    lam: float
    per_parameter: dict = field(default_factory=dict)  # name -> elements dampened (for inspection)

    @property
    def fraction_dampened(self) -> float:
        return self.dampened / self.total if self.total else 0.0


def _check_hyper(alpha: float, lam: float) -> None:
    for name, v in (("alpha (selection weighting)", alpha), ("lambda (dampening constant)", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"SSD {name} must be a finite number > 0, got {v!r}")


def fisher_importance(model: nn.Module, loader: Iterable, device=None) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher importances of every parameter of ``model`` (frozen ones too: SSD dampens whatever the
    unlearned model will use) over ``loader`` (batches of (x, y)): the mean over batches of the squared gradient of
    the batch's mean cross-entropy. Returns ``({name: importance}, samples seen)``. The model is run in eval mode and
    left as it was (mode, ``.grad`` and ``requires_grad`` restored)."""
    params = dict(model.named_parameters())
    if not params:
        raise ValueError("fisher_importance: the model has no parameter")
    if device is None:
        device = next(iter(params.values())).device
    imp = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    for p in params.values():
        p.requires_grad_(True)
    batches = samples = 0
    try:
        for x, y in loader:
            for p in params.values():
                p.grad = None
            loss = F.cross_entropy(model(x.to(device)).float(), torch.as_tensor(y).to(device))
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    imp[n] += p.grad.detach().float().pow(2)
            batches += 1
            samples += int(x.shape[0])
    finally:
        for n, p in params.items():
            p.grad = saved_grads[n]
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    if batches == 0:
        raise ValueError("fisher_importance: the loader yielded no batch (an empty forget class?)")
    return {n: v / batches for n, v in imp.items()}, samples


@torch.no_grad()
def ssd_dampen(model: nn.Module, forget_importance: dict, full_importance: dict, alpha: float = SSD_ALPHA,
               lam: float = SSD_LAMBDA) -> tuple[int, int, dict]:
    """Dampen ``model`` IN PLACE: every parameter element with ``I_f > alpha * I_D`` is multiplied by
    ``min(lam * I_D / I_f, 1)``. Returns (elements dampened, elements considered, {name: elements dampened})."""
    _check_hyper(alpha, lam)
    params = dict(model.named_parameters())
    missing = sorted(set(forget_importance) ^ set(full_importance))
    if missing:
        raise ValueError(f"ssd_dampen: the two importance dicts cover different parameters: {missing[:5]}")
    dampened = total = 0
    per = {}
    for n, i_f in forget_importance.items():
        if n not in params:
            raise ValueError(f"ssd_dampen: importance for {n!r}, which the model does not have")
        p, i_d = params[n], full_importance[n]
        if i_f.shape != p.shape or i_d.shape != p.shape:
            raise ValueError(f"ssd_dampen: importance shape of {n!r} does not match the parameter {tuple(p.shape)}")
        i_f, i_d = i_f.to(p.device), i_d.to(p.device)
        sel = i_f > alpha * i_d
        # i_f > alpha * i_d >= 0 where selected, so the division is safe there
        beta = torch.where(sel, (lam * i_d / torch.where(sel, i_f, torch.ones_like(i_f))).clamp(max=1.0),
                           torch.ones_like(i_f))
        p.mul_(beta.to(p.dtype))
        k = int(sel.sum())
        dampened += k
        total += p.numel()
        per[n] = k
    return dampened, total, per


def ssd_unlearn(model: nn.Module, forget_loader: Iterable, full_loader: Iterable | None = None, *,
                alpha: float = SSD_ALPHA, lam: float = SSD_LAMBDA, device=None,
                full_importance: dict | None = None) -> SSDResult:
    """SSD for one forget set: a dampened COPY of ``model`` (the input is not touched) and its cost.

    ``forget_loader``: batches of the forget class's training samples; ``full_loader``: batches of the full training
    data, or ``full_importance`` from :func:`fisher_importance` (computed once, shared by every class). Use the same
    batch size for both: the importance of a batch-level squared gradient depends on it."""
    _check_hyper(alpha, lam)
    if full_importance is None and full_loader is None:
        raise ValueError("ssd_unlearn needs full_loader or full_importance (the full training data's importances)")
    m = copy.deepcopy(model)
    if device is not None:
        m = m.to(device)
    full_seconds, full_samples = 0.0, 0
    if full_importance is None:
        t0 = time.perf_counter()
        full_importance, full_samples = fisher_importance(m, full_loader, device)
        full_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    forget_importance, samples = fisher_importance(m, forget_loader, device)
    dampened, total, per = ssd_dampen(m, forget_importance, full_importance, alpha, lam)
    seconds = time.perf_counter() - t0
    for p in m.parameters():
        p.requires_grad_(False)
    return SSDResult(m.eval(), seconds, samples, full_seconds, full_samples, dampened, total, float(alpha), float(lam),
                     per)
