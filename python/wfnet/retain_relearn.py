"""Retain-only relearning: the audit metric ``relearn_retain`` (issue 27).

Class unlearning is often shallow: fine-tuning the unlearned model on the RETAIN classes alone, with no sample of
the forgotten class c, brings Acc_f back for many methods, while a model retrained without c stays near 0 ("From
Dormant to Deleted", 2025). The attacker here never sees class c; whatever Acc_f comes back was still in the model.

Protocol (**decision**, the budget every audited model gets, fixed seeds):

* pool: up to ``pool`` (default 1000) training samples of the retain classes, drawn at random (seeded);
* ``steps`` (default 100) SGD steps, lr ``lr`` (default 0.001), momentum 0.9, batch ``min(64, pool)`` - the loop of
  the k-shot attack (:func:`wfnet.audit.relearn_fewshot`). **decision**, measured on the digits (small CNN, seed 0,
  classes 0-2, 2026-12-05): at lr 0.01 the retain-only fine-tuning drives the ORIGINAL model's Acc_f to 0.11 (its
  class-c logit is pushed down), so the attack cannot tell suppression from deletion; at lr 0.001 the original keeps
  0.978 while the retrained model stays at 0.000 and the unlearned models spread (WF-Net 0.08, its hard export 0.12,
  negative gradients 0.43); at 0.0001 nothing moves (original 0.992, every unlearned model <= 0.015);
* parameters: every weight of the model under test (:func:`wfnet.audit._attackable`): all weights of a baseline or
  an exported plain model (soft or hard export); for WF-Net run with row c, the backbone weights while the row-c
  gates stay applied and fixed (the gate logits are not trained), as an attacker who holds the served model would;
* the model runs in eval mode (BatchNorm statistics as served), as in the k-shot attack;
* value: Acc_f (accuracy on class c's test samples) after the fine-tuning; lower = the forgetting survives.
  The original (no unlearning) and the model retrained without c, put through the same fine-tuning, are the range.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["RETAIN_STEPS", "RETAIN_LR", "RETAIN_POOL", "retain_pool", "relearn_retain"]

RETAIN_STEPS = 100
RETAIN_LR = 0.001  # calibrated: at 0.01 the fine-tuning itself erases class c from the ORIGINAL (see below)
RETAIN_POOL = 1000


def retain_pool(labels: torch.Tensor, forget_class: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to ``n`` samples whose label is not ``forget_class``, drawn at random with ``gen``."""
    if n < 1:
        raise ValueError(f"retain_pool needs n >= 1, got {n}")
    idx = torch.nonzero(torch.as_tensor(labels) != forget_class).flatten()
    if idx.numel() == 0:
        raise ValueError(f"retain_pool: no sample outside class {forget_class}")
    return idx[torch.randperm(idx.numel(), generator=gen)[:n]] if idx.numel() > n else idx


def relearn_retain(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                   trainable: Callable[[nn.Module], list], retain_x: torch.Tensor, retain_y: torch.Tensor,
                   eval_x: torch.Tensor, eval_y: torch.Tensor, target_class: int, device,
                   steps: int = RETAIN_STEPS, lr: float = RETAIN_LR, seed: int = 0) -> float:
    """Acc_f on ``target_class`` after fine-tuning a COPY of ``model`` on retain samples only.

    ``forward(m, x)`` runs the copy (e.g. ``m(x, forget=c)`` for WF-Net: the gates stay applied), ``trainable(m)``
    lists the parameters fine-tuned. ``retain_x / retain_y`` must hold no sample of ``target_class`` (``ValueError``
    otherwise: that would be the k-shot attack, not this one). ``model`` is not touched."""
    from .audit import relearn_fewshot  # the shared fine-tuning loop (lazy: audit imports this module)

    retain_y = torch.as_tensor(retain_y)
    if retain_y.numel() == 0:
        raise ValueError("relearn_retain: the retain pool is empty")
    if bool((retain_y == target_class).any()):
        raise ValueError(f"relearn_retain: the retain pool holds {int((retain_y == target_class).sum())} samples of "
                         f"the forgotten class {target_class}")
    if lr <= 0:
        raise ValueError(f"relearn_retain needs lr > 0, got {lr}")
    return relearn_fewshot(model, forward, trainable, retain_x, retain_y, eval_x, eval_y, target_class, steps,
                           device, lr=lr, seed=seed)
