"""Evaluation metrics of the paper's Table 1 and Table 2 (docs/method.md section 4), usable on any classifier.

Design:

* A "model for class c" is a callable ``forward(x) -> logits``. The same code therefore serves WF-Net
  (``lambda x: wf(x, forget=c)``), the per-class baselines (``baseline_model(method, c)``) and the original model.
* Everything is batched through DataLoaders; per-sample work is tensor arithmetic, never a Python loop. Logits are
  gathered on the CPU in fp32 so that the metric arithmetic is device- and precision-independent.
* No metric modifies the models it is given: relearn time fine-tunes a deep copy, insertion / deletion override
  the gate logits through ``torch.func.functional_call`` (the stored parameters are never written).

Metrics and their direction (from the unlearning point of view, for the forgotten class c):

================  ===========================================================================  ====================
metric            definition                                                                   better
================  ===========================================================================  ====================
Acc_f             accuracy (%) on the test samples of class c, model for c                     lower (ideal 0)
Acc_r             accuracy (%) on the test samples of every other class, model for c           higher (ideal: orig.)
ZRF               1 - mean_i JS(p_i, q_i) over class-c test samples; p the model, q a random   higher
                  network of the same architecture (fixed seed); textbook JS, natural log
ZRF (Bad-Teach.)  the Bad-Teaching reference code's quantity (see ``zrf_bad_teaching``)        higher
RT                epochs of 500 random training samples until class-c accuracy is back at     higher
                  the original model's; capped (default 100) -> "never"
Insertion         AUC of normalised class-c confidence while re-opening the most relevant      higher
                  gates of the unlearned model
Deletion          AUC of normalised class-c confidence while closing the most relevant         lower
                  gates of the original model
================  ===========================================================================  ====================
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .data import labels_of
from .model import WFModel

__all__ = [
    "Forward", "predict", "accuracy", "labels_of", "class_subset", "forget_retain_from_predictions",
    "accuracy_forget_retain", "accuracy_forget_retain_shared", "js_divergence", "zrf", "zrf_bad_teaching",
    "zrf_from_logits", "zrf_score", "zrf_bad_teaching_score", "bad_teaching_from_logits", "RelearnResult", "relearn_time",
    "summarize_relearn",
    "channel_ranking", "gate_steps", "gate_curve", "insertion_deletion", "GATE_OPEN", "GATE_CLOSED",
]

Forward = Callable[[torch.Tensor], torch.Tensor]

# Gate logits that act as "fully open" / "fully closed": sigmoid(30) rounds to exactly 1.0 in fp32 and
# sigmoid(-30) ~ 9e-14, so an "all open" row reproduces the unfiltered model.
GATE_OPEN = 30.0
GATE_CLOSED = -30.0


# ----------------------------------------------------------------------------------------------------------------
# Predictions and data helpers


def _resolve_device(forward, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(forward, nn.Module):
        p = next(forward.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _split_batch(batch):
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("the loader must yield (inputs, labels) pairs; got a batch of type "
                         f"{type(batch).__name__}")
    return batch[0], torch.as_tensor(batch[1])


@torch.no_grad()
def predict(forward: Forward, loader: Iterable, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward`` over every batch of ``loader``; return (logits [N, K] fp32 on CPU, labels [N] int64 on CPU)."""
    device = _resolve_device(forward, device)
    logits, labels = [], []
    for batch in loader:
        x, y = _split_batch(batch)
        out = forward(x.to(device, non_blocking=True))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"forward must return logits of shape [batch, num_classes], got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        logits.append(out.detach().float().cpu())
        labels.append(y.reshape(-1).long().cpu())
    if not logits:
        raise ValueError("the loader yielded no batch")
    return torch.cat(logits), torch.cat(labels)


def class_subset(dataset: Dataset, c: int, labels: torch.Tensor | None = None) -> Subset:
    """The samples of ``dataset`` whose label is ``c`` (raises ValueError when there are none)."""
    labels = labels_of(dataset) if labels is None else labels
    idx = torch.nonzero(labels == c).flatten().tolist()
    if not idx:
        raise ValueError(f"the dataset has no sample of class {c}")
    return Subset(dataset, idx)


@torch.no_grad()
def accuracy(forward: Forward, loader: Iterable, device=None) -> float:
    """Top-1 accuracy (%) of ``forward(x) -> logits`` over ``loader`` (the predictions are compared on the device;
    only the counts come back)."""
    device = _resolve_device(forward, device)
    correct = total = 0
    for batch in loader:
        x, y = _split_batch(batch)
        correct += int((forward(x.to(device, non_blocking=True)).argmax(1) == y.to(device)).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Put ``module`` in eval mode and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------------------------------------------
# Acc_f / Acc_r


def forget_retain_from_predictions(pred: torch.Tensor, labels: torch.Tensor, c: int) -> dict:
    """Acc_f (%, samples of class c) and Acc_r (%, all other samples) from predicted and true labels.

    A side with no sample gives NaN (it is then left out of the means by the callers).
    """
    correct = (pred == labels)
    forget = labels == c
    n_f, n_r = int(forget.sum()), int((~forget).sum())
    acc_f = 100.0 * float(correct[forget].sum()) / n_f if n_f else math.nan
    acc_r = 100.0 * float(correct[~forget].sum()) / n_r if n_r else math.nan
    return {"acc_f": acc_f, "acc_r": acc_r, "n_f": n_f, "n_r": n_r}


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _summarise_acc(per_class: dict) -> dict:
    return {"per_class": per_class, "acc_f": _nanmean(r["acc_f"] for r in per_class.values()),
            "acc_r": _nanmean(r["acc_r"] for r in per_class.values())}


def accuracy_forget_retain(forward_for_class: Callable[[int], Forward], loader: Iterable, classes: Sequence[int],
                           device=None, progress: bool = False) -> dict:
    """Acc_f and Acc_r (in %) per class c with the model for c, and their means over ``classes``.

    ``forward_for_class(c)`` returns the model that forgot c (for WF-Net ``lambda x: wf(x, forget=c)``); it is run
    over the whole test ``loader`` once per class. Acc_f: lower is better (ideal 0); Acc_r: higher is better (ideal:
    the original model's). Returns ``{"per_class": {c: {"acc_f", "acc_r", "n_f", "n_r"}}, "acc_f", "acc_r"}``.
    """
    from tqdm import tqdm

    per_class = {}
    for c in tqdm(list(classes), desc="Acc_f/Acc_r", disable=not progress, leave=False):
        fwd = forward_for_class(int(c))
        logits, labels = predict(fwd, loader, _resolve_device(fwd, device))
        per_class[int(c)] = forget_retain_from_predictions(logits.argmax(1), labels, int(c))
    return _summarise_acc(per_class)


def accuracy_forget_retain_shared(forward: Forward, loader: Iterable, classes: Sequence[int], device=None) -> dict:
    """Acc_f / Acc_r of ONE model for every class (the original model's row of Table 1): a single pass."""
    logits, labels = predict(forward, loader, device)
    pred = logits.argmax(1)
    return _summarise_acc({int(c): forget_retain_from_predictions(pred, labels, int(c)) for c in classes})


# ----------------------------------------------------------------------------------------------------------------
# ZRF


def _check_probs(p: torch.Tensor, q: torch.Tensor):
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {list(p.shape)} and {list(q.shape)}")
    if p.dim() == 0:
        raise ValueError("p and q must be probability vectors (last dimension = classes)")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook Jensen-Shannon divergence along the last dimension, natural log: 0.5 KL(p||m) + 0.5 KL(q||m),
    m = (p + q) / 2. Inputs are probability vectors (rows sum to 1); 0 log 0 = 0. In [0, ln 2]; lower = closer."""
    _check_probs(p, q)
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    # xlogy(p, p) - xlogy(p, m): wherever p > 0 also m > 0, and p = 0 contributes exactly 0.
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def zrf(p: torch.Tensor, q: torch.Tensor) -> float:
    """Zero Retrain Forgetting: 1 - mean over rows of JS(p_i, q_i) (textbook JS, natural log).

    p: softmax of the model under test on the forget-class samples, q: softmax of a randomly initialised network
    of the same architecture. Higher = closer to random behaviour = better forgetting; in [1 - ln 2, 1]. A one-hot
    p against a uniform q over 10 classes gives 0.4744.
    """
    return float(1.0 - js_divergence(p, q).reshape(-1).mean())


def zrf_bad_teaching(p: torch.Tensor, q: torch.Tensor) -> float:
    """The quantity the Bad-Teaching reference code (Chundawat et al., AAAI 2023, vikram2000b/bad-teaching-
    unlearning, ``UnLearningScore``) reports as ZRF; offered under its own name because it is NOT the textbook one.

    Their ``JSDiv(p, q) = 0.5 * F.kl_div(log p, m) + 0.5 * F.kl_div(log q, m)`` with ``F.kl_div``'s default
    ``reduction="mean"``: ``F.kl_div(log p, m)`` is KL(m||p) (the other way round from the textbook KL(p||m)),
    averaged over samples AND classes (divided by N * K instead of N). The score is ``1 - JSDiv``, so it is much
    closer to 1 than the textbook ZRF and shrinks with the number of classes. Exactly-zero probabilities give an
    infinite divergence there, as in the reference code (``zrf_bad_teaching_score`` works from log-softmax, which
    avoids that for model outputs). Higher is better.
    """
    _check_probs(p, q)
    p, q = p.double(), q.double()
    return _bad_teaching_from_logs(p, q, torch.log(p), torch.log(q))


def _bad_teaching_from_logs(p, q, log_p, log_q) -> float:
    m = 0.5 * (p + q)

    def kl_div_mean(log_x):  # F.kl_div(log_x, m) with reduction="mean", written out (that reduction is deprecated)
        pointwise = torch.special.xlogy(m, m) - m * log_x
        return torch.where(m > 0, pointwise, torch.zeros_like(pointwise)).mean()

    return float(1.0 - (0.5 * kl_div_mean(log_p) + 0.5 * kl_div_mean(log_q)))


def zrf_from_logits(logits: torch.Tensor, rlogits: torch.Tensor) -> float:
    """:func:`zrf` of the model's logits against the random network's on the same samples (softmax in float64):
    the one place ZRF is computed from model outputs (the evaluator and :func:`zrf_score` both call it)."""
    return zrf(torch.softmax(logits.double(), -1), torch.softmax(rlogits.double(), -1))


def _zrf_probs(forward, random_forward, loader, device):
    logits, _ = predict(forward, loader, device)
    rlogits, _ = predict(random_forward, loader, _resolve_device(random_forward, device))
    return logits, rlogits


def zrf_score(forward: Forward, random_forward: Forward, loader: Iterable, device=None) -> float:
    """Model-level ZRF (see :func:`zrf`) over the samples of ``loader`` (the forget class's test samples).

    ``random_forward`` is the randomly initialised network of the same architecture (e.g.
    ``run.build_model(seed=fixed)``). Higher is better.
    """
    logits, rlogits = _zrf_probs(forward, random_forward, loader, device)
    return zrf_from_logits(logits, rlogits)


def zrf_bad_teaching_score(forward: Forward, random_forward: Forward, loader: Iterable, device=None) -> float:
    """Model-level Bad-Teaching variant (see :func:`zrf_bad_teaching`), with logs taken by log-softmax."""
    logits, rlogits = _zrf_probs(forward, random_forward, loader, device)
    return bad_teaching_from_logits(logits, rlogits)


def bad_teaching_from_logits(logits: torch.Tensor, rlogits: torch.Tensor) -> float:
    """:func:`zrf_bad_teaching` computed from logits (log-softmax instead of log(softmax), same value, finite)."""
    lp, lq = torch.log_softmax(logits.double(), 1), torch.log_softmax(rlogits.double(), 1)
    return _bad_teaching_from_logs(lp.exp(), lq.exp(), lp, lq)


# ----------------------------------------------------------------------------------------------------------------
# Relearn time


@dataclass
class RelearnResult:
    """``epochs``: the relearn time (None = never within ``max_epochs``); ``accuracies``: class-c accuracy (%)
    before fine-tuning and after each epoch run; ``target``: the accuracy (%) to reach."""
    epochs: int | None
    accuracies: list[float] = field(default_factory=list)
    target: float = math.nan




def relearn_time(model: nn.Module, train_set: Dataset, eval_loader: Iterable, target_acc: float, *,
                 forget: int | None = None, max_epochs: int = 100, samples_per_epoch: int = 500, lr: float = 0.01,
                 batch_size: int = 64, seed: int = 0, device=None, num_workers: int = 0,
                 progress: bool = False) -> RelearnResult:
    """Relearn Time (RT): epochs of fine-tuning needed until the forgotten class is recognised again. Higher = the
    knowledge is really gone.

    Starting from a DEEP COPY of ``model`` (the argument is never modified):

    * WF-Net (``model`` is a :class:`~wfnet.WFModel`, ``forget=c`` required): the inner model's original weights are
      made trainable, the gates stay fixed and row c is applied in every forward.
    * any other model (a baseline's unlearned model for c): all its weights are trainable; ``forget`` must be None.

    Fine-tuning (**decision**, docs/method.md section 4): plain SGD (no momentum), ``lr`` 0.01, no weight decay,
    cross-entropy with the true labels; each epoch draws ``samples_per_epoch`` samples (500) at random, without
    replacement within the epoch, from the FULL training set ``train_set``; batches of ``batch_size``; the model is in
    train mode with every normalisation layer kept in eval mode (as WF-Net's untraining, so that a few hundred
    samples do not shift the running statistics). The sampling generator and the global RNG (dropout) are seeded
    with ``seed`` inside a forked RNG state, so every class and every method sees the same sequence of samples and
    the caller's RNG state is untouched.

    Stopping rule: the accuracy on ``eval_loader`` (the class-c test samples) is checked BEFORE any epoch and after
    every epoch; RT is the number of epochs run when it first reaches ``target_acc`` (the original model's accuracy
    on class c, in %) -- so a model that already knows the class has RT 0. If it is not reached after
    ``max_epochs`` (100) epochs, ``epochs`` is None ("never"; see :func:`summarize_relearn` for how it is averaged).
    """
    from tqdm import tqdm

    if max_epochs < 0 or samples_per_epoch < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("relearn_time needs max_epochs >= 0, samples_per_epoch >= 1, batch_size >= 1, lr > 0")
    is_wf = isinstance(model, WFModel)
    if is_wf and forget is None:
        raise ValueError("relearn_time on a WFModel needs forget=c (the gate row to keep applied)")
    if not is_wf and forget is not None:
        raise ValueError("forget= applies only to a WFModel; a baseline's model is already the unlearned one")
    n_train = len(train_set)
    if n_train == 0:
        raise ValueError("the training set is empty")
    device = _resolve_device(model, device)

    # channels_last: the same computation (up to float rounding), ~1.4x faster training steps on the CPU (measured
    # on the demo's small CNN, fwd + bwd, batch 64)
    m = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    if is_wf:
        for p in m.model.parameters():
            p.requires_grad_(True)
        for p in m.filter_parameters():
            p.requires_grad_(False)
        forward = lambda x: m(x, forget=forget)  # noqa: E731
    else:
        for p in m.parameters():
            p.requires_grad_(True)
        forward = m
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)

    def set_train():
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase):
                mod.eval()

    # The class-c samples are read once, onto the device; every check reuses them.
    eval_batches = [(_to(x, device), y.to(device)) for x, y in map(_split_batch, eval_loader)]
    m.eval()
    accs = [accuracy(forward, eval_batches, device)]
    # A small tolerance only absorbs float noise: both accuracies are ratios of counts.
    if accs[0] >= target_acc - 1e-9:
        return RelearnResult(0, accs, target_acc)

    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    tensors = _tensors_of(train_set)  # (inputs, labels) of an in-memory dataset: batches by indexing, no collate
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for epoch in tqdm(range(1, max_epochs + 1), desc="relearn", disable=not progress, leave=False):
            idx = torch.randperm(n_train, generator=gen)[:samples_per_epoch]
            if tensors is not None:
                batches = ((tensors[0][i], tensors[1][i]) for i in idx.split(batch_size))
            else:
                batches = map(_split_batch, DataLoader(Subset(train_set, idx.tolist()), batch_size=batch_size,
                                                       shuffle=False, num_workers=num_workers))
            set_train()
            for x, y in batches:
                x, y = _to(x, device), y.to(device).long()
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(forward(x), y)
                loss.backward()
                opt.step()
            m.eval()
            accs.append(accuracy(forward, eval_batches, device))
            if accs[-1] >= target_acc - 1e-9:
                return RelearnResult(epoch, accs, target_acc)
    return RelearnResult(None, accs, target_acc)


def _to(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _tensors_of(ds: Dataset):
    """(inputs, labels) tensors of a TensorDataset or a Subset of one, else None."""
    if isinstance(ds, Subset):
        inner = _tensors_of(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return inner[0][idx], inner[1][idx]
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[0], ds.tensors[1]
    return None


def summarize_relearn(epochs: Sequence[int | None], max_epochs: int) -> dict:
    """Mean relearn time over classes and the number of classes never relearned.

    **decision**: a class that never relearned counts as ``max_epochs`` in the mean (so the mean is a lower bound
    whenever ``never > 0``); when NO class relearned the mean is shown as ">max_epochs", as the paper writes
    ">100 (10)". ``display`` is the paper's format "mean (never)".
    """
    epochs = list(epochs)
    if not epochs:
        return {"mean": math.nan, "never": 0, "display": "-", "max_epochs": max_epochs}
    never = sum(e is None for e in epochs)
    mean = sum(max_epochs if e is None else e for e in epochs) / len(epochs)
    shown = f">{max_epochs}" if never == len(epochs) else f"{mean:.1f}"
    return {"mean": mean, "never": never, "display": f"{shown} ({never})", "max_epochs": max_epochs}


# ----------------------------------------------------------------------------------------------------------------
# Insertion / deletion over the gates


def channel_ranking(wf: WFModel, c: int) -> dict[str, torch.Tensor]:
    """Per filtered layer, its channel indices ordered from most to least relevant for class c: lowest
    sigmoid(alpha_weight[c]) first (ties broken by channel index)."""
    if not isinstance(wf, WFModel):
        raise TypeError(f"channel_ranking expects a WFModel, got {type(wf).__name__}")
    if not 0 <= c < wf.num_classes:
        raise ValueError(f"class {c} is out of range: num_classes={wf.num_classes}")
    return {name: torch.argsort(layer.alpha_weight.detach()[c].float().cpu(), stable=True)
            for name, layer in wf.filtered_layers().items()}


def gate_steps(steps: int | Sequence[float] = 21) -> torch.Tensor:
    """The fractions p of channels changed per curve point: ``steps`` evenly spaced points in [0, 1] (21 = every
    5%), or an explicit increasing sequence that starts at 0 and ends at 1 (the AUC is over [0, 1])."""
    if isinstance(steps, int):
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    t = torch.as_tensor(list(steps), dtype=torch.float64)
    if t.dim() != 1 or t.numel() < 2 or float(t[0]) != 0.0 or float(t[-1]) != 1.0 or bool((t.diff() <= 0).any()):
        raise ValueError(f"steps must be increasing fractions from 0 to 1, got {t.tolist()}")
    return t


def _num_changed(p: float, channels: int) -> int:
    # Round to the nearest channel count (half up), per layer: p = 5% of 64 channels -> 3.
    return min(channels, int(math.floor(p * channels + 0.5)))


def _gate_overrides(wf: WFModel, c: int, p: float, mode: str, ranking: dict) -> dict:
    """Replacement gate logits for row c at fraction p (the parameters themselves are never written)."""
    out = {}
    for name, layer in wf.filtered_layers().items():
        k = _num_changed(p, layer.alpha_weight.shape[1])
        top = ranking[name][:k].to(layer.alpha_weight.device)
        for attr in ("alpha_weight", "alpha_bias"):
            alpha = getattr(layer, attr)
            if alpha is None:
                continue
            new = alpha.detach().clone()
            if mode == "insertion":  # unlearned row c, most relevant channels re-opened
                new[c, top] = GATE_OPEN
            else:  # unfiltered row (all open), most relevant channels closed (weight and bias gates)
                new[c] = GATE_OPEN
                new[c, top] = GATE_CLOSED
            out[f"model.{name}.{attr}"] = new
    return out


@torch.no_grad()
def _class_confidence(forward, loader, c, device) -> float:
    logits, _ = predict(forward, loader, device)
    return float(torch.softmax(logits.double(), 1)[:, c].mean())


@torch.no_grad()
def gate_curve(wf: WFModel, c: int, loader: Iterable, mode: str, steps: int | Sequence[float] = 21, device=None,
               reference: float | None = None) -> dict:
    """One insertion or deletion curve for class c over the class-c samples of ``loader``.

    At each fraction p, the top ``round(p * C_out)`` channels of EVERY filtered layer (ranked by
    :func:`channel_ranking`) are re-opened (``mode="insertion"``, starting from row c's gates: the unlearned model)
    or closed (``mode="deletion"``, starting from all gates open: the original model). Gates are set through logits
    of +/-30 (sigmoid 1 / ~0), for the weight and the bias gates alike. The value is the mean softmax confidence
    for class c divided by the original model's (``reference``, computed if not given). Returns
    ``{"steps", "curve", "auc"}``, AUC by the trapezoid rule over p in [0, 1]. Insertion: higher is better;
    deletion: lower is better.
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    ranking = channel_ranking(wf, c)
    fractions = gate_steps(steps)
    device = _resolve_device(wf, device)
    with _eval_mode(wf):
        if reference is None:
            reference = _class_confidence(lambda x: wf(x), loader, c, device)
        if not reference > 0:
            raise ValueError(f"the original model's confidence for class {c} is {reference}; cannot normalise")
        values = []
        for p in fractions.tolist():
            over = _gate_overrides(wf, c, p, mode, ranking)
            def fwd(x, over=over):
                return torch.func.functional_call(wf, over, (x,), {"forget": c}, strict=False)

            values.append(_class_confidence(fwd, loader, c, device) / reference)
    curve = torch.tensor(values, dtype=torch.float64)
    return {"steps": fractions.tolist(), "curve": curve.tolist(),
            "auc": float(torch.trapezoid(curve, fractions))}


def insertion_deletion(wf: WFModel, c: int, loader: Iterable, steps: int | Sequence[float] = 21,
                       device=None) -> dict:
    """Insertion and deletion curves and scores for class c (see :func:`gate_curve`), sharing the reference
    confidence: ``{"insertion": {...}, "deletion": {...}, "reference": conf}``."""
    device = _resolve_device(wf, device)
    with _eval_mode(wf):
        reference = _class_confidence(lambda x: wf(x), loader, c, device)
    return {"insertion": gate_curve(wf, c, loader, "insertion", steps, device, reference),
            "deletion": gate_curve(wf, c, loader, "deletion", steps, device, reference),
            "reference": reference}
