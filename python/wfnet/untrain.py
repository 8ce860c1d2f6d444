"""Single-round multi-class untraining: teach the gates of a wrapped model to forget ANY class on demand.

One mini-batch of B samples trains all class rows at once by *label expansion* (method.md section 3):

* forget half (B/2 samples): each runs with row = its own label; its cross-entropy CE_f should go UP;
* retain half (B/2 samples), replicated ``chi`` times: each copy runs with a row drawn uniformly among the classes
  other than its label; its cross-entropy CE_r should stay low.

With ``set_size`` K > 0 (forget SETS, :mod:`wfnet.sets`), every expanded sample runs with a random set of 1..K classes
instead of one row (:func:`expand_batch_sets`): the forget half's sets hold its label, the retain copies' do not, so
the gates learn to compose (measured in docs/results/sets).

One forward pass over the B/2 + chi*B/2 samples (each with its own row), then

    L = lambda_retain * mean(CE_r) + lambda_forget * F(CE_f) + lambda_reg * R(alpha)
    R(alpha) = mean over every filtered gate entry of (1 - sigmoid(alpha))        (**decision**, method.md)
    F = mean(1 / (CE_f + eps))   ("mean_inverse", the paper's Eq. 3)   or   1 / (mean(CE_f) + eps)  ("inverse_mean")

Only the gates train; the original weights stay frozen and the whole network runs in eval mode (**decision**:
BatchNorm statistics and dropout of the frozen network must not change; it also makes runs exactly repeatable).

Two recipes (every value can be overridden):

* ``paper``: the paper's hyper-parameters: plain SGD with lr 100 on the gate logits (**decision**: SGD, since the
  paper's "learning rate 100" is meaningless for Adam), lambdas (1, 10, 1) for CNNs and (1, 100, 1) for ViTs,
  ``mean_inverse`` with eps 1e-6 (**decision**: the guard against division by zero), alpha init 3, batch 128, chi 3,
  early stopping with patience 10 validations, 5 validations per epoch on the validation loss.
* ``tuned`` (the default): what our MNIST calibration (method.md section 6, and docs/recipes.md) showed to keep
  retain accuracy: Adam lr 0.1, gate logits clamped to [-6, 6] after every step so sigmoid' never vanishes (with lr
  100 the gates saturate and never reopen), eps 0.05 so one very confident forget sample (CE ~ 0.01 -> 1/CE ~ 100)
  cannot dominate a batch, and a 20x heavier retain weight (lambda0 = 20, lambda1 = 10, lambda2 = 1). Same label
  expansion, batch, chi, init and early stopping. Measured side by side in docs/recipes.md. For ViTs the tuned
  lambdas are (200, 100, 1): the paper's lambda1 = 100 with a twice heavier retain weight (the CNN lambdas barely
  move the qkv gates, docs/results/calibration_mnist_cpu.md; 200 keeps 0.9 points more retain accuracy than 100 on
  ViT-T, docs/results/reproduce_mnist_cpu/README.md).

``amp="bf16"`` runs the forward passes under bfloat16 autocast (the gates, the loss and the optimizer stay fp32).

Checkpoints: at every validation the full training state (current and best gates, optimizer state, counters, history)
is written atomically to ``<run>/untrain_state.safetensors``; ``resume=True`` continues from it to the same result
(the data order and the random rows are functions of (seed, epoch, step), not of a global RNG). At the end the best
gates (lowest validation loss) are loaded into the model.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import RECIPES, UntrainConfig, recipe
from .checkpoint import load_state, optimizer_from_flat, optimizer_to_flat, save_state
from .distributed import DistInfo, all_reduce_mean, shard
from .model import classifier_head
from .train import autocast
from .model import WFModel
from .sets import DEFAULT_COMPOSITION, use_composition

__all__ = ["untrain_step", "UntrainConfig", "recipe", "expand_batch", "expand_batch_sets", "untrain_loss", "gate_regulariser", "untrain", "RECIPES",
           "model_kind", "options_key"]


def model_kind(wf: WFModel) -> str:
    """"vit" when attention projections are filtered (any family: qkv Linear, MHA in-projection, ...), else "cnn"."""
    return wf.kind


def expand_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, chi: int, generator: torch.Generator):
    """Label expansion of one mini-batch.

    Returns ``(inputs, rows, labels, n_forget)``: the first ``n_forget = B // 2`` entries are the forget half (row =
    label); the rest are the other half repeated ``chi`` times with rows drawn uniformly among the non-label classes.
    """
    if num_classes < 2:
        raise ValueError("label expansion needs at least 2 classes")
    n_forget = x.shape[0] // 2
    y_r = y[n_forget:].repeat(chi)
    x_r = x[n_forget:].repeat((chi,) + (1,) * (x.dim() - 1))
    offset = torch.randint(1, num_classes, (y_r.shape[0],), generator=generator).to(y.device)
    rows_r = (y_r + offset) % num_classes  # never the label: offset in [1, num_classes)
    inputs = torch.cat([x[:n_forget], x_r])
    rows = torch.cat([y[:n_forget], rows_r])
    labels = torch.cat([y[:n_forget], y_r])
    return inputs, rows, labels, n_forget


def expand_batch_sets(x: torch.Tensor, y: torch.Tensor, num_classes: int, chi: int, max_size: int,
                      generator: torch.Generator):
    """Label expansion with forget SETS (``set_size`` > 0): as :func:`expand_batch`, but every expanded sample gets a
    random set of k classes, k uniform in 1..max_size (capped at num_classes - 1), as a bool mask [N, N_c]: the
    forget half's set holds its label (CE_f should go up under the set), the retain copies' sets do not (CE_r should
    stay low under the set). Sets of one class are among them, so the single-class rows keep being trained.

    Returns ``(inputs, mask, labels, n_forget)``."""
    if num_classes < 2:
        raise ValueError("label expansion needs at least 2 classes")
    if max_size < 1:
        raise ValueError(f"set_size must be >= 1 for set expansion, got {max_size}")
    n_forget = x.shape[0] // 2
    y_r = y[n_forget:].repeat(chi)
    x_r = x[n_forget:].repeat((chi,) + (1,) * (x.dim() - 1))
    labels = torch.cat([y[:n_forget], y_r])
    n = labels.shape[0]
    k = torch.randint(1, min(max_size, num_classes - 1) + 1, (n,), generator=generator)
    # a random order of the classes per sample with the label first (forget half) or last (retain copies): the
    # first k of that order are the sample's set
    scores = torch.rand(n, num_classes, generator=generator)
    lab = labels.cpu()
    forget = torch.arange(n) < n_forget
    scores[torch.arange(n), lab] = torch.where(forget, torch.full((n,), -1.0), torch.full((n,), 2.0))
    rank = scores.argsort(1).argsort(1)  # rank of each class in the sample's order
    mask = rank < k.unsqueeze(1)
    inputs = torch.cat([x[:n_forget], x_r])
    return inputs, mask.to(y.device), labels, n_forget


def _composition(cfg):
    """The set composition the gates are trained with (``set_composition``; only read by forwards with sets)."""
    return use_composition(getattr(cfg, "set_composition", None) or DEFAULT_COMPOSITION)


def _expand(x, y, num_classes, cfg, generator):
    if getattr(cfg, "set_size", 0):
        return expand_batch_sets(x, y, num_classes, cfg.chi, cfg.set_size, generator)
    return expand_batch(x, y, num_classes, cfg.chi, generator)


def gate_regulariser(params) -> torch.Tensor:
    """R(alpha) = mean over every gate entry of (1 - sigmoid(alpha)): small when almost all gates are open."""
    flat = torch.cat([p.float().reshape(-1) for p in params])
    return (1 - torch.sigmoid(flat)).mean()


def feature_forget_term(features: torch.Tensor, n_forget: int, generator: torch.Generator) -> torch.Tensor:
    """The feature-level forget term (issue 14): every forget sample's penultimate features (under its own row) are
    pulled toward those of a random retain sample of the batch (detached), relative to the retain features' mean
    squared norm. Output suppression leaves class c linearly decodable from the features; this term asks the gates
    to make class c's features look like other classes' instead."""
    f = features.float().flatten(1)
    forget, retain = f[:n_forget], f[n_forget:].detach()
    if forget.shape[0] == 0 or retain.shape[0] == 0:
        return f.sum() * 0
    j = torch.randint(0, retain.shape[0], (forget.shape[0],), generator=generator).to(f.device)
    scale = retain.pow(2).sum(1).mean().clamp_min(1e-12)
    return (forget - retain[j]).pow(2).sum(1).mean() / scale


def untrain_loss(logits, labels, n_forget: int, params, cfg: UntrainConfig, features: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of method.md section 3 on one expanded batch; returns (loss, {"forget_ce", "retain_ce", "reg", ...}).
    With ``cfg.lambda_feature > 0``, ``features`` (the classifier head's input) and ``generator`` add
    :func:`feature_forget_term`."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    ce_f, ce_r = ce[:n_forget], ce[n_forget:]
    zero = ce.sum() * 0
    if ce_f.numel() == 0:
        forget_term = zero
    elif cfg.forget_loss == "mean_inverse":
        forget_term = (1.0 / (ce_f + cfg.eps)).mean()
    elif cfg.forget_loss == "inverse_mean":
        forget_term = 1.0 / (ce_f.mean() + cfg.eps)
    else:
        raise ValueError(f"unknown forget_loss {cfg.forget_loss!r}: use 'mean_inverse' or 'inverse_mean'")
    retain_term = ce_r.mean() if ce_r.numel() else zero
    reg = gate_regulariser(params)
    loss = cfg.lambda_retain * retain_term + cfg.lambda_forget * forget_term + cfg.lambda_reg * reg
    names, terms = ["loss", "forget_ce", "retain_ce", "forget_term", "reg"], []
    if cfg.lambda_feature > 0:
        if features is None or generator is None:
            raise ValueError("lambda_feature > 0 needs the classifier head's input features and a generator")
        feature_term = feature_forget_term(features, n_forget, generator)
        loss = loss + cfg.lambda_feature * feature_term
        names, terms = names + ["feature_term"], [feature_term]
    # One device-to-host copy for all the parts (five .item() calls would be five syncs on a GPU).
    forget_ce = ce_f.mean() if ce_f.numel() else torch.full((), float("nan"), device=logits.device)
    values = torch.stack([loss, forget_ce, retain_term, forget_term, reg, *terms]).detach().float().tolist()
    parts = dict(zip(names, values))
    return loss, parts


@contextlib.contextmanager
def _head_input(model: nn.Module, wanted: bool):
    """Yield a list that receives the classifier head's input during the forwards run inside (when ``wanted``)."""
    captured: list[torch.Tensor] = []
    if not wanted:
        yield captured
        return
    head = classifier_head(getattr(model, "module", model))  # DDP holds the WFModel in .module
    hook = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        hook.remove()


def _features(captured: list, wanted: bool):
    if not wanted:
        return None
    if len(captured) != 1:
        raise RuntimeError(f"the classifier head ran {len(captured)} times in one forward; the feature term needs "
                           f"exactly one penultimate representation")
    return captured[0]


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch to the device without blocking the host: from pinned memory a copy to a GPU is queued on the stream
    (from pageable memory it is a synchronous copy, a host sync per tensor per step)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def untrain_step(model, params, opt, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: UntrainConfig,
                 generator: torch.Generator, device, info: DistInfo | None = None) -> dict:
    """One untraining step on the mini-batch (x, y) (CPU tensors): label expansion with ``generator``, one forward
    of every expanded sample with its own row, the loss, a step of ``opt`` on the gates ``params``, the clamp.
    Returns the loss parts (fetched from the device in one copy: the step's only host sync)."""
    inputs, rows, labels, nf = _expand(x, y, num_classes, cfg, generator)
    inputs, rows, labels, nf = _shard_expanded(inputs, rows, labels, nf, info or DistInfo())
    wanted = cfg.lambda_feature > 0
    with autocast(device, cfg.amp), _head_input(model, wanted) as captured, _composition(cfg):
        logits = model(_to_device(inputs, device), forget=rows)  # CPU rows: validated on the CPU, moved by the router
    loss, parts = untrain_loss(logits.float(), _to_device(labels, device), nf, params, cfg,
                               _features(captured, wanted), generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cfg.alpha_clamp is not None:
        with torch.no_grad():
            for p in params:
                p.clamp_(-cfg.alpha_clamp, cfg.alpha_clamp)
    return parts


def _rows_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


@torch.no_grad()
def validation_loss(wf: nn.Module, params, val_ds: Dataset, num_classes: int, cfg: UntrainConfig, device,
                    info: DistInfo) -> dict:
    """The untraining loss on the validation set, with label expansion drawn from a fixed seed (so it is the same
    function at every validation). Each rank takes its shard of every batch; results are averaged over ranks."""
    totals: dict[str, float] = {}
    n = 0
    loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 256), shuffle=False)
    for i, (x, y) in enumerate(loader):
        inputs, rows, labels, nf = _expand(x, y, num_classes, cfg, _rows_generator(cfg.seed, -1, i))
        inputs, rows, labels, nf = _shard_expanded(inputs, rows, labels, nf, info)
        gen = _rows_generator(cfg.seed, -2, i)  # the feature term's pairing: fixed too
        wanted = cfg.lambda_feature > 0
        with autocast(device, cfg.amp), _head_input(wf, wanted) as captured, _composition(cfg):
            logits = wf(_to_device(inputs, device), forget=rows)  # CPU rows: validated on the CPU, moved by the router
        _, parts = untrain_loss(logits.float(), _to_device(labels, device), nf, params, cfg,
                                _features(captured, wanted), gen)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v * x.shape[0]
        n += x.shape[0]
    out = {k: v / max(n, 1) for k, v in totals.items()}
    return {k: all_reduce_mean(v, info) for k, v in out.items()}


def _shard_expanded(inputs, rows, labels, n_forget, info: DistInfo):
    """Split an expanded batch across ranks: each rank gets its slice of the forget part AND of the retain part."""
    if not info.enabled:
        return inputs, rows, labels, n_forget
    parts = [(shard(t[:n_forget], info), shard(t[n_forget:], info)) for t in (inputs, rows, labels)]
    nf = parts[0][0].shape[0]
    return (*(torch.cat(p) for p in parts), nf)


def untrain(wf: WFModel, train_ds: Dataset, val_ds: Dataset, cfg: UntrainConfig, device,
            state_path: str | Path | None = None, resume: bool = False, info: DistInfo | None = None,
            progress: bool = True) -> dict:
    """Train the gates of ``wf`` for all classes in one round (see the module docstring). Returns a summary dict
    (history of validations, best validation loss, steps, stop reason, seconds)."""
    info = info or DistInfo()
    num_classes = wf.num_classes
    wf.to(device).eval()
    wf.probe_coverage(train_ds, device)  # refuse a model whose filtered layers get no gate gradient
    params = list(wf.filter_parameters())
    with torch.no_grad():  # the configured init (wrap() used its own init; a fresh run starts from cfg.init)
        if not resume or state_path is None or not Path(state_path).exists():
            for p in params:
                p.fill_(cfg.init)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adam'")
    named = dict(wf.named_filter_parameters())
    steps_per_epoch = max(1, math.ceil(len(train_ds) / cfg.batch_size))
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {cfg.max_steps}")
    span = steps_per_epoch if cfg.max_steps is None else min(steps_per_epoch, cfg.max_steps)
    val_every = max(1, span // cfg.val_per_epoch)
    st = {"epoch": 0, "step": 0, "global_step": 0, "best_val": float("inf"), "bad": 0, "history": [],
          "stopped": None, "seconds": 0.0}
    best = {k: p.detach().clone() for k, p in named.items()}
    if resume and state_path is not None and Path(state_path).exists():
        tensors, meta = load_state(state_path)
        if meta.get("config") != options_key(cfg):
            raise ValueError(f"{state_path} was written with a different untraining config; start a new run folder "
                             f"or pass the same options")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(tensors[f"gates.{k}"])
                best[k] = tensors[f"best.{k}"].to(device)
        optimizer_from_flat(opt, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
        st = meta["state"]
    model = wf
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(wf, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        if state_path is None or not info.is_main:
            return
        tensors = {f"gates.{k}": p for k, p in named.items()}
        tensors.update({f"best.{k}": v for k, v in best.items()})
        opt_tensors, opt_meta = optimizer_to_flat(opt)
        tensors.update(opt_tensors)
        save_state(state_path, tensors, {"state": st, "optimizer": opt_meta, "config": options_key(cfg)})

    t0 = time.time() - st["seconds"]
    total_steps = cfg.max_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = tqdm(total=total_steps, initial=st["global_step"], desc="untrain", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    while st["stopped"] is None and st["epoch"] < cfg.max_epochs:
        epoch = st["epoch"]
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        order = perm[st["step"] * cfg.batch_size:].tolist()
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers)
        for x, y in loader:
            parts = untrain_step(model, params, opt, x, y, num_classes, cfg,
                                 _rows_generator(cfg.seed, epoch, st["step"]), device, info)
            st["step"] += 1
            st["global_step"] += 1
            bar.update(1)
            bar.set_postfix(forget_ce=f"{parts['forget_ce']:.2f}", retain_ce=f"{parts['retain_ce']:.3f}",
                            reg=f"{parts['reg']:.3f}", epoch=epoch + 1)
            last = st["global_step"] >= total_steps
            if st["step"] % val_every == 0 or st["step"] == steps_per_epoch or last:
                val = validation_loss(model, params, val_ds, num_classes, cfg, device, info)
                improved = val["loss"] < st["best_val"] - 1e-6
                if improved:
                    st["best_val"], st["bad"] = val["loss"], 0
                    best = {k: p.detach().clone() for k, p in named.items()}
                else:
                    st["bad"] += 1
                st["history"].append({"epoch": epoch + 1, "step": st["global_step"], "train": parts, "val": val,
                                      "improved": improved})
                if st["bad"] >= cfg.patience:
                    st["stopped"] = f"early stopping: no improvement in {cfg.patience} validations"
                elif last and cfg.max_steps is not None and st["global_step"] >= cfg.max_steps:
                    st["stopped"] = f"reached max_steps={cfg.max_steps}"
                if st["step"] == steps_per_epoch:
                    st["epoch"], st["step"] = epoch + 1, 0
                st["seconds"] = time.time() - t0
                checkpoint()
                if st["stopped"]:
                    break
    bar.close()
    if st["stopped"] is None:
        st["stopped"] = f"reached max_epochs={cfg.max_epochs}"
    st["seconds"] = time.time() - t0
    checkpoint()
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(best[k])
    return {"best_val_loss": st["best_val"], "steps": st["global_step"], "epochs_run": st["epoch"],
            "stopped": st["stopped"], "seconds": st["seconds"], "history": st["history"], "config": options_key(cfg)}


def options_key(cfg: UntrainConfig) -> dict:
    """The options that define an untraining result (everything but the worker count), as saved with it."""
    d = asdict(cfg)
    d.pop("num_workers")
    return d
