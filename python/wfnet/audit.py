"""The unlearning audit: what is left of a forgotten class beyond the accuracy numbers (method.md section 7).

Three measurements, each applied the same way to WF-Net (run with row c), its hard export, the baselines and the
model retrained without class c (the reference):

* ``mia``: membership-inference efficacy (Unlearn-Sparse / SalUn's ``SVC_MIA``, the "confidence" variant both papers
  report). Per sample feature: the softmax probability of the true class. A support-vector classifier is fitted on
  shadow data: retain-class TRAINING samples labelled member (1) and TEST samples labelled non-member (0), equally
  many of each; it is applied to the forget class's training samples. Efficacy = the fraction judged non-member
  (0..1; higher = the model treats its own training samples of class c like data it never saw; the retrained model
  scores about 1 for class-wise forgetting).
* ``probe``: linear-probe leakage. Penultimate features (the input of the classifier head) of the model under test;
  a logistic-regression probe is fitted on held-out labelled samples of ALL classes and scored on class c's test
  samples (0..1; lower = class c is less decodable from the features). The same probe on the original model and
  on the retrained model gives the range: the retrained model still learns generic features, so its probe accuracy
  on c is not 0.
* ``relearn_fewshot``: a k-shot relearning attack. Starting from the model under test, fine-tune on k images of
  class c mixed with k images per retain class for a fixed number of steps, either the head only or the whole
  network (for WF-Net: the weights with the row-c gates held fixed, as an attacker who holds the served model
  would); report Acc_f after the attack (lower = the knowledge is harder to bring back).

**decision**: the SVC of ``mia`` uses scikit-learn's ``SVC(C=3, gamma="auto", kernel="rbf")`` as in Unlearn-Sparse;
the probe is ``LogisticRegression(max_iter=1000)`` on standardised features; the attack uses SGD (lr 0.01, momentum
0.9) for ``steps`` steps of batch ``min(64, pool)`` with a fixed seed. Everything is seeded, so a rerun gives the same
number.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["true_class_confidence", "mia_efficacy", "probe_accuracy", "classifier_head", "penultimate_features",
           "relearn_fewshot", "AUDIT_METRICS"]

AUDIT_METRICS = ("mia", "probe", "relearn_fewshot")


# ----------------------------------------------------------------------------------------------------------- MIA
def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """softmax(logits)[i, labels[i]] per sample, as a float64 numpy array (the MIA feature)."""
    p = torch.softmax(logits.detach().float(), dim=1)
    return p.gather(1, labels.view(-1, 1).to(p.device)).squeeze(1).double().cpu().numpy()


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Fraction of ``target`` samples that an SVC, fitted on ``member`` (label 1) vs ``non_member`` (label 0)
    features, judges non-members. The two shadow sets are cut to the same size (random, seeded)."""
    from sklearn.svm import SVC

    if len(target) == 0:
        raise ValueError("mia_efficacy: no target samples (the forget class has no training samples?)")
    member, non_member, target = (np.asarray(a, dtype=np.float64).reshape(len(a), -1)
                                  for a in (member, non_member, target))
    n = min(len(member), len(non_member))
    if n < 2:
        raise ValueError(f"mia_efficacy needs at least 2 member and 2 non-member samples, got {len(member)} and "
                         f"{len(non_member)}")
    rng = np.random.default_rng(seed)
    member = member[rng.choice(len(member), n, replace=False)]
    non_member = non_member[rng.choice(len(non_member), n, replace=False)]
    x = np.concatenate([member, non_member])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float((clf.predict(target) == 0).mean())


# ----------------------------------------------------------------------------------------------------------- probe
def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   target_class: int) -> float:
    """Accuracy on ``target_class``'s test samples of a logistic-regression probe fitted on (train_x, train_y)
    (features standardised with the training statistics)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test_x, test_y = np.asarray(test_x), np.asarray(test_y)
    mask = test_y == target_class
    if not mask.any():
        raise ValueError(f"probe_accuracy: no test sample of class {target_class}")
    if target_class not in set(np.asarray(train_y).tolist()):
        raise ValueError(f"probe_accuracy: the probe's training samples hold no sample of class {target_class}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(np.asarray(train_x), np.asarray(train_y))
    return float((probe.predict(test_x[mask]) == target_class).mean())


def classifier_head(model: nn.Module) -> nn.Module:
    """The module whose INPUT is the penultimate representation: timm's ``get_classifier()``, else the last
    ``nn.Linear`` in the model (torchvision's ``fc`` / ``classifier[-1]`` / ``heads.head``)."""
    inner = getattr(model, "model", model)  # a WFModel holds the classifier in .model
    get = getattr(inner, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    last = None
    for m in inner.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(inner).__name__} has no nn.Linear classifier head to take features from")
    return last


@torch.no_grad()
def penultimate_features(run: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, batches: Iterable,
                         device) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]): the input of ``head`` while ``run(x)`` computes the logits, over ``batches``
    of (x, y). ``run`` decides how the model is run (e.g. ``lambda x: wf(x, forget=c)``)."""
    feats, labels = [], []
    captured = []
    hook = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().flatten(1).float()))
    try:
        for x, y in batches:
            captured.clear()
            run(x.to(device))
            if len(captured) != 1:
                raise RuntimeError(f"the classifier head ran {len(captured)} times in one forward; cannot tell which "
                                   f"input is the penultimate representation")
            feats.append(captured[0].cpu())
            labels.append(y.cpu())
    finally:
        hook.remove()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


# ----------------------------------------------------------------------------------------------------------- relearn
def relearn_fewshot(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    trainable: Callable[[nn.Module], list], attack_x: torch.Tensor, attack_y: torch.Tensor,
                    eval_x: torch.Tensor, eval_y: torch.Tensor, target_class: int, steps: int, device,
                    lr: float = 0.01, seed: int = 0) -> float:
    """Acc_f (accuracy on ``eval_x`` samples of ``target_class``) after a k-shot attack on a COPY of ``model``.

    ``forward(m, x)`` runs the copy (e.g. with the row-c gates applied); ``trainable(m)`` lists the parameters the
    attacker trains (head only, or all weights); they are unfrozen on the copy. ``attack_x / attack_y`` is the
    attacker's pool (k images of the class plus retain images). The original model is not touched.
    """
    if steps < 1:
        raise ValueError("relearn_fewshot needs steps >= 1")
    m = copy.deepcopy(model).to(device)
    m.eval()  # BatchNorm statistics and dropout stay as served: the attacker fine-tunes weights only
    params = list(trainable(m))
    if not params:
        raise ValueError("relearn_fewshot: the attack trains no parameter")
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    pool = attack_x.shape[0]
    batch = min(64, pool)
    for _ in range(steps):
        idx = torch.randperm(pool, generator=gen)[:batch]
        loss = F.cross_entropy(forward(m, attack_x[idx].to(device)).float(), attack_y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mask = eval_y == target_class
    if not bool(mask.any()):
        raise ValueError(f"relearn_fewshot: no evaluation sample of class {target_class}")
    with torch.no_grad():
        correct = 0
        xs, ys = eval_x[mask], eval_y[mask]
        for i in range(0, xs.shape[0], 256):
            pred = forward(m, xs[i:i + 256].to(device)).argmax(1).cpu()
            correct += int((pred == ys[i:i + 256]).sum())
    return correct / int(mask.sum())
