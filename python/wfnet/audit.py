"""The unlearning audit: what is left of a forgotten class beyond the accuracy numbers (docs/method.md section 8).

Four measurements, each applied the same way to WF-Net (run with row c), its hard export, the baselines and the
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
* ``relearn_retain``: retain-only relearning (:mod:`wfnet.retain_relearn`): fine-tune every weight of the model under
  test (WF-Net: the backbone with the row-c gates applied and fixed) on retain-class training samples only, with no
  image of class c, for ``retain_steps`` steps; report Acc_f after it. The original and the retrained model get the
  same fine-tuning (the range).

**decision**: the SVC of ``mia`` uses scikit-learn's ``SVC(C=3, gamma="auto", kernel="rbf")`` as in Unlearn-Sparse;
the probe is ``LogisticRegression(max_iter=1000)`` on standardised features; the attack uses SGD (lr 0.01, momentum
0.9) for ``steps`` steps of batch ``min(64, pool)`` with a fixed seed. Everything is seeded, so a rerun gives the same
number.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import files
from .config import opt, opt_list
from .data import labels_of
from .errors import RunError
from .model import HARD_EXPORT_THRESHOLD, classifier_head, export  # classifier_head: re-exported here
from .report import method_label
from .retain_relearn import RETAIN_LR, RETAIN_POOL, RETAIN_STEPS, relearn_retain, retain_pool
from .run import Run
from .seeds import derive_seed

__all__ = ["true_class_confidence", "mia_efficacy", "probe_accuracy", "classifier_head", "penultimate_features",
           "relearn_fewshot", "AuditSubject", "run_audit", "audit_markdown", "AUDIT_METRICS", "AuditConfig", "run"]

AUDIT_METRICS = ("mia", "probe", "relearn_fewshot", "relearn_retain")  # on request: `wfnet evaluate --metrics mia,probe,...`


@dataclass
class AuditConfig:
    """The unlearning audit's protocol (``wfnet evaluate --metrics mia,probe,relearn_fewshot,relearn_retain``)."""
    audit_samples: int = opt(1000, "audit: samples per set (MIA members / non-members / targets, probe fit)")
    audit_shots: list[int] | None = opt_list("audit: images of the class per k-shot relearning attack (default: "
                                             "10,50)")
    audit_steps: int = opt(50, "audit: SGD steps of each relearning attack")
    hard_threshold: float = opt(HARD_EXPORT_THRESHOLD, "audit: gate threshold of the hard export it also audits")
    retain_steps: int = opt(RETAIN_STEPS, "audit: SGD steps of the retain-only relearning (relearn_retain)")
    retain_lr: float = opt(RETAIN_LR, "audit: learning rate of the retain-only relearning (SGD, momentum 0.9)")
    retain_samples: int = opt(RETAIN_POOL, "audit: retain-class training samples the retain-only relearning draws "
                                           "its batches from")
    audit_seed: int = opt(0, "audit: seed of every sample draw and attack of the audit")


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


# ----------------------------------------------------------------------------------------------- the audit of a run
class AuditSubject:
    """One model under audit, per forgotten class: ``model_for(c)`` returns ``(model, forward)`` where
    ``forward(model, x)`` gives the logits of the model that forgets c (WF-Net: ``m(x, forget=c)``; an export or a
    per-class baseline: ``m(x)``). ``skip`` lists the metrics that do not apply (e.g. relearn on the original)."""

    def __init__(self, name: str, model_for: Callable[[int], tuple], skip: Iterable[str] = ()):
        self.name = name
        self.model_for = model_for
        self.skip = set(skip)


def _stack(ds, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _pick(labels: torch.Tensor, mask: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.nonzero(mask).flatten()
    return idx[torch.randperm(idx.numel(), generator=gen)[:n]] if idx.numel() > n else idx


@torch.no_grad()
def _logits(model, forward, x: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    return torch.cat([forward(model, x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)])


def run_audit(subjects: list[AuditSubject], train_ds, val_ds, test_ds, classes: Iterable[int], device,
              metrics: Iterable[str] = AUDIT_METRICS, shots: tuple[int, ...] = (10, 50), steps: int = 50,
              max_samples: int = 1000, seed: int = 0, progress: bool = False, retain_steps: int = RETAIN_STEPS,
              retain_lr: float = RETAIN_LR, retain_samples: int = RETAIN_POOL) -> dict:
    """Every audit metric for every subject and class; returns ``{"per_class": {subject: {metric: {c: value}}},
    "mean": {subject: {metric: value}}, "protocol": {...}}``.

    Protocol (**decision**, fixed seeds): MIA members = up to ``max_samples`` retain-class training samples,
    non-members = as many retain-class test samples, target = up to ``max_samples`` class-c training samples. Probe
    fitted on up to ``max_samples`` validation samples of all classes, scored on class c's test samples. Relearn:
    pool = ``k`` class-c training images + ``k`` per retain class, ``steps`` SGD steps, head only and full network,
    scored on class c's test samples (metrics ``relearn_k{k}_head`` / ``relearn_k{k}_full``). Retain-only
    relearning: up to ``retain_samples`` retain-class training images, ``retain_steps`` SGD steps at ``retain_lr``,
    every weight (metric ``relearn_retain``; every subject, the original included).
    """
    metrics = list(metrics)
    unknown = set(metrics) - set(AUDIT_METRICS)
    if unknown:
        raise ValueError(f"unknown audit metric(s) {sorted(unknown)}: choose from {', '.join(AUDIT_METRICS)}")
    if "relearn_retain" in metrics and (retain_steps < 1 or not retain_lr > 0 or retain_samples < 1):
        raise ValueError(f"relearn_retain needs retain_steps >= 1, retain_lr > 0 and retain_samples >= 1, got "
                         f"{retain_steps}, {retain_lr}, {retain_samples}")
    classes = list(classes)
    y_train, y_val, y_test = labels_of(train_ds), labels_of(val_ds), labels_of(test_ds)
    per_class: dict = {s.name: {} for s in subjects}
    gen = torch.Generator().manual_seed(seed)
    probe_idx = torch.randperm(len(y_val), generator=gen)[:max_samples]
    probe_x, probe_y = _stack(val_ds, probe_idx)
    bar = tqdm(total=len(classes) * len(subjects), desc="audit", disable=not progress, dynamic_ncols=True)
    for c in classes:
        g = torch.Generator().manual_seed(derive_seed(seed, "audit-samples", c))
        member_x, member_y = _stack(train_ds, _pick(y_train, y_train != c, max_samples, g))
        nonmember_x, nonmember_y = _stack(test_ds, _pick(y_test, y_test != c, max_samples, g))
        target_x, target_y = _stack(train_ds, _pick(y_train, y_train == c, max_samples, g))
        eval_x, eval_y = _stack(test_ds, torch.nonzero(y_test == c).flatten())
        pools = {}
        for k in shots:
            idx = torch.cat([_pick(y_train, y_train == r, k, g) for r in sorted(set(y_train.tolist()))])
            pools[k] = _stack(train_ds, idx)
        if "relearn_retain" in metrics:
            retain_x, retain_y = _stack(train_ds, retain_pool(
                y_train, c, retain_samples, torch.Generator().manual_seed(derive_seed(seed, "audit-retain", c))))
        for s in subjects:
            model, forward = s.model_for(c)
            out = per_class[s.name]
            if "mia" in metrics and "mia" not in s.skip:
                conf = [true_class_confidence(_logits(model, forward, x, device), y)
                        for x, y in ((member_x, member_y), (nonmember_x, nonmember_y), (target_x, target_y))]
                out.setdefault("mia", {})[c] = mia_efficacy(*conf, seed=seed)
            if "probe" in metrics and "probe" not in s.skip:
                head = classifier_head(model)
                run = lambda t, m=model, f=forward: f(m, t)  # noqa: E731
                fx, fy = penultimate_features(run, head, _batches(probe_x, probe_y), device)
                tx, ty = penultimate_features(run, head, _batches(eval_x, eval_y), device)
                out.setdefault("probe", {})[c] = probe_accuracy(fx, fy, tx, ty, c)
            if "relearn_fewshot" in metrics and "relearn_fewshot" not in s.skip:
                for k, (px, py) in pools.items():
                    for mode, params in (("head", lambda m: list(classifier_head(m).parameters())),
                                         ("full", _attackable)):
                        out.setdefault(f"relearn_k{k}_{mode}", {})[c] = relearn_fewshot(
                            model, forward, params, px, py, eval_x, eval_y, c, steps, device, seed=seed)
            if "relearn_retain" in metrics and "relearn_retain" not in s.skip:
                out.setdefault("relearn_retain", {})[c] = relearn_retain(
                    model, forward, _attackable, retain_x, retain_y, eval_x, eval_y, c, device, steps=retain_steps,
                    lr=retain_lr, seed=derive_seed(seed, "audit-retain-order", c))
            bar.update(1)
    bar.close()
    mean = {name: {m: float(np.mean(list(v.values()))) for m, v in res.items()} for name, res in per_class.items()}
    return {"per_class": per_class, "mean": mean, "classes": classes,
            "protocol": {"max_samples": max_samples, "shots": list(shots), "steps": steps, "seed": seed,
                         "mia": "SVC(C=3, rbf) on true-class confidence; members: retain-class train, non-members: "
                                "retain-class test, target: class-c train; value = fraction judged non-member",
                         "probe": "logistic regression on standardised penultimate features of validation samples "
                                  "(all classes); value = accuracy on class-c test samples",
                         "relearn": f"SGD lr 0.01 momentum 0.9, {steps} steps, batch <= 64, pool = k class-c + k per "
                                    f"retain class training images; value = Acc_f after the attack",
                         "relearn_retain": f"SGD lr {retain_lr:g} momentum 0.9, {retain_steps} steps, batch <= 64, "
                                           f"every weight (WF-Net: row-c gates applied and fixed), pool = up to "
                                           f"{retain_samples} retain-class training images, no image of class c; "
                                           f"value = Acc_f after the fine-tuning",
                         "retain_steps": retain_steps, "retain_lr": retain_lr, "retain_samples": retain_samples}}


def _batches(x, y, batch: int = 256):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, x.shape[0], batch)]


def _attackable(model: nn.Module) -> list:
    """Every weight an attacker who holds the model can fine-tune: all parameters except wfnet's gate logits (a
    WF-Net model is attacked with its row-c gates held fixed)."""
    return [p for n, p in model.named_parameters() if not n.rsplit(".", 1)[-1].startswith("alpha_")]


def audit_markdown(result: dict, title: str = "Audit") -> str:
    """The mean-over-classes audit table (one row per subject), with what each column means."""
    cols = []
    for res in result["mean"].values():
        for m in res:
            if m not in cols:
                cols.append(m)
    names = {"mia": "MIA efficacy (up)", "probe": "probe acc. on c (down)",
             "relearn_retain": "Acc_f after retain-only fine-tuning (down)"}
    head = [names.get(c, c.replace("relearn_", "Acc_f after ") + " (down)") for c in cols]
    lines = [f"## {title}", "", f"Mean over classes {result['classes']}; values in [0, 1].", "",
             "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for name, res in result["mean"].items():
        lines.append(f"| {name} | " + " | ".join(f"{res[c]:.3f}" if c in res else "-" for c in cols) + " |")
    p = result["protocol"]
    lines += ["", f"- MIA: {p['mia']}.", f"- Probe: {p['probe']}.", f"- Relearn: {p['relearn']}."]
    if "relearn_retain" in p and "relearn_retain" in cols:  # audits saved before the metric existed lack the key
        lines.append(f"- Retain-only relearning: {p['relearn_retain']}.")
    lines.append(f"- Up to {p['max_samples']} samples per set, seed {p['seed']}.")
    return "\n".join(lines) + "\n"


def run(run: Run, cfg: AuditConfig, metrics, methods, classes_of: dict, *, force: bool = False,
        progress: bool = True) -> dict:
    """The ``audit`` stage (:mod:`wfnet.evaluate` calls it for the audit metrics): the audit of the run's models,
    written to ``eval/audit.{md,json}``.

    Subjects: the original (reference; no k-shot attack, but the retain-only fine-tuning: its Acc_f after it is the
    upper end of that metric's range), WF-Net run with row c, its hard export at
    ``cfg.hard_threshold``, and every baseline in ``methods`` ("retrain" is the reference a forgetting method is
    compared with). Classes: those every audited model has (``classes_of``). The JSON names the stamps of the models
    it measured and the request (metrics, methods, classes, protocol): when both still match, the audit is read
    back instead of recomputed (like the other evaluation caches; ``force`` recomputes it).
    """
    metrics = [m for m in AUDIT_METRICS if m in metrics]
    classes = sorted(set.intersection(*[set(classes_of[m]) for m in methods if classes_of.get(m)]))
    if not classes:
        raise RunError("the audit needs classes that every audited model has; run the baselines on common "
                       "classes or choose --methods")
    baselines = [m for m in methods if m not in ("original", "wfnet")]
    stamps = {"original": run.model_stamp("original")}
    if "wfnet" in methods:
        stamps["wfnet"] = run.model_stamp("wfnet")
    for method in baselines:
        stamps[method] = {str(c): run.model_stamp(method, c) for c in classes}
    shots = list(cfg.audit_shots or (10, 50))
    request = {"metrics": metrics, "methods": list(methods), "classes": classes, "stamps": stamps,
               "options": {**asdict(cfg), "audit_shots": shots}}
    root = Path(run.run_dir)
    cached = _cached(root, request) if not force else None
    if cached is not None:
        return cached
    orig = run.original_model()
    subjects = [AuditSubject("original", lambda c: (orig, lambda m, t: m(t)), skip={"relearn_fewshot"})]
    if "wfnet" in methods:
        wf = run.wrapped()
        subjects.append(AuditSubject("WF-Net (row c)", lambda c: (wf, lambda m, t, c=c: m(t, forget=c))))
        subjects.append(AuditSubject(
            f"WF-Net hard export (T={cfg.hard_threshold:g})",
            lambda c: (export(wf, forget=c, hard=cfg.hard_threshold).eval(), lambda m, t: m(t))))
    for method in baselines:
        subjects.append(AuditSubject(method_label(method), lambda c, method=method: (run.baseline_model(method, c),
                                                                                      lambda m, t: m(t))))
    data = run.data
    result = run_audit(subjects, data.train, data.val, data.test, classes, run.device, metrics=metrics,
                       shots=tuple(shots), steps=cfg.audit_steps, max_samples=cfg.audit_samples, seed=cfg.audit_seed,
                       progress=progress, retain_steps=cfg.retain_steps, retain_lr=cfg.retain_lr,
                       retain_samples=cfg.retain_samples)
    md = audit_markdown(result, f"Audit: {run.config.get('dataset', '?')} / {run.config.get('model', '?')}")
    payload = {**result, "stamps": stamps, "hard_threshold": cfg.hard_threshold, "request": request}
    files.write_json(files.staging_path(root, "eval/audit.json"), files.json_safe(payload))
    files.write_text(files.staging_path(root, "eval/audit.md"), md)
    files.commit(root, new=["eval/audit.json", "eval/audit.md"])
    return {**files.json_safe(payload), "markdown": md}


def _cached(root: Path, request: dict) -> dict | None:
    """The audit in ``root/eval`` when it answers ``request`` (same models by stamp, same protocol), else None."""
    path, md = root / "eval" / "audit.json", root / "eval" / "audit.md"
    if not path.exists() or not md.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("request") != files.json_safe(request):
        return None
    return {**saved, "markdown": md.read_text(encoding="utf-8"), "cached": True}
