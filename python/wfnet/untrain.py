"""Single-round multi-class untraining: teach the gates of a wrapped model to forget ANY class on demand.

One mini-batch of B samples trains all class rows at once by *label expansion* (docs/method.md section 3):

* forget half (B/2 samples): each runs with row = its own label; its cross-entropy CE_f should go UP;
* retain half (B/2 samples), replicated ``chi`` times: each copy runs with a row drawn uniformly among the classes
  other than its label; its cross-entropy CE_r should stay low.

With ``set_size`` K > 0 (forget SETS, :mod:`wfnet.sets`), every expanded sample runs with a random set of 1..K classes
instead of one row (:func:`expand_batch_sets`): the forget half's sets hold its label, the retain copies' do not, so
the gates learn to compose (measured in docs/results/sets).

One forward pass over the B/2 + chi*B/2 samples (each with its own row), then

    L = lambda_retain * mean(CE_r) + lambda_forget * F(CE_f) + lambda_reg * R(alpha)
    R(alpha) = mean over every filtered gate entry of (1 - sigmoid(alpha))        (**decision**, docs/method.md section 3)
    F = mean(1 / (CE_f + eps))   ("mean_inverse", the paper's Eq. 3)   or   1 / (mean(CE_f) + eps)  ("inverse_mean")

Only the gates train; the original weights stay frozen and the whole network runs in eval mode (**decision**:
BatchNorm statistics and dropout of the frozen network must not change; it also makes runs exactly repeatable).

Two recipes (every value can be overridden):

* ``paper``: the paper's hyper-parameters: plain SGD with lr 100 on the gate logits (**decision**: SGD, since the
  paper's "learning rate 100" is meaningless for Adam), lambdas (1, 10, 1) for CNNs and (1, 100, 1) for ViTs,
  ``mean_inverse`` with eps 1e-6 (**decision**: the guard against division by zero), alpha init 3, batch 128, chi 3,
  early stopping with patience 10 validations, 5 validations per epoch on the validation loss.
* ``tuned`` (the default): what our MNIST calibration (docs/method.md section 6, and docs/recipes.md) showed to keep
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import files
from . import metrics
from .backends import BackendUnavailableError
from .checkpoint import load_state, optimizer_from_flat, optimizer_to_flat, read_state_meta, save_state
from .config import opt, with_defaults
from .distributed import DistInfo, all_reduce_mean, shard
from .errors import RunError
from .model import WFModel, classifier_head
from .report import accuracy_md
from .run import (FILTERS, RESULTS_JSON, RESULTS_MD, UNTRAIN_STATE, UNTRAIN_SUMMARY, Run, differences, new_stamp,
                  one_line)
from .seeds import derive_seed
from .serialization import load_filters, save_filters
from .sets import DEFAULT_COMPOSITION
from .train import autocast, make_loader

__all__ = ["untrain_step", "UntrainConfig", "recipe", "expand_batch", "expand_batch_sets", "untrain_loss",
           "gate_regulariser", "untrain", "RECIPES", "options_key", "saved_options", "config_for", "run"]

RECIPES = ("paper", "tuned")


@dataclass
class UntrainConfig:
    """One untraining round (``wfnet untrain``); the defaults are the ``tuned`` recipe for CNNs (see
    :func:`recipe` and :mod:`wfnet.untrain`)."""
    recipe: str = opt("tuned", "tuned (Adam, clamped gates) or paper (SGD lr 100, the paper's lambdas); every "
                               "value below defaults to the recipe's", choices=RECIPES)
    targets: str | list[str] = opt("auto", "layers to filter: auto, or comma-separated module names / glob "
                                             "patterns")
    optimizer: str = opt("adam", "optimizer on the gate logits", choices=("sgd", "adam"))
    lr: float = opt(0.1, "learning rate on the gate logits")
    lambda_retain: float = opt(20.0, "lambda0, weight of the mean cross-entropy on retained rows")
    lambda_forget: float = opt(10.0, "lambda1, weight of the reciprocal forget cross-entropy")
    lambda_reg: float = opt(1.0, "lambda2, weight of R = mean(1 - sigmoid(alpha))")
    lambda_feature: float = opt(0.0, "weight of the feature-level forget term (0 = off): each forget sample's "
                                      "penultimate features are pulled toward a random retain sample's, so class c "
                                      "stops being decodable from the features (issue 14; see docs/results)")
    forget_loss: str = opt("mean_inverse", "mean_inverse = mean(1/(CE_f+eps)) (the paper's), inverse_mean = "
                                           "1/(mean(CE_f)+eps)", choices=("mean_inverse", "inverse_mean"))
    eps: float = opt(0.05, "guard in 1/(CE_f + eps)")
    alpha_clamp: float | None = opt(6.0, "clamp the gate logits to [-c, c] after each step (0 or less: no clamp)")
    chi: int = opt(3, "copies of the retain half in label expansion")
    set_size: int = opt(0, "label expansion with forget SETS: every expanded sample runs with a random set of 1..K "
                           "classes (the forget half's sets hold its label, the retain half's do not), so that "
                           "composed sets keep retain accuracy (0 = one class row per sample, the paper's; see "
                           "docs/results/sets)")
    set_composition: str = opt("relative", "how a set's gates compose in untraining with --set-size (and then in "
                                           "evaluation of those gates): product, min or relative (wfnet.sets)",
                               choices=("product", "min", "relative"))
    batch_size: int = opt(128, "mini-batch size before label expansion")
    init: float = opt(3.0, "initial gate logit (3 -> sigmoid 0.95)")
    amp: str = opt("off", "bf16: untrain under bfloat16 autocast (gates and their optimizer stay fp32)",
                   choices=("off", "bf16"))
    max_epochs: int = opt(10, "epochs at most")
    max_steps: int | None = opt(None, "steps at most (default: max_epochs decides); the last step is validated")
    patience: int = opt(10, "validations without improvement before early stopping")
    val_per_epoch: int = opt(5, "validations per epoch")
    seed: int = opt(0, "seed of the data order and of the random rows")
    num_workers: int = opt(0, "DataLoader worker processes", flag=False)


def recipe(name: str = "tuned", kind: str = "cnn", **overrides) -> UntrainConfig:
    """The ``paper`` or ``tuned`` recipe for a backbone of kind ``kind`` (:attr:`wfnet.WFModel.kind`, the one home
    of a model's kind), with overrides (None = keep the recipe's value; an ``alpha_clamp`` of 0 or less = no
    clamp)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    if kind not in ("cnn", "vit"):
        raise ValueError(f"kind must be 'cnn' or 'vit' (WFModel.kind), got {kind!r}")
    if name == "paper":
        cfg = UntrainConfig(recipe="paper", optimizer="sgd", lr=100.0, lambda_retain=1.0,
                            lambda_forget=100.0 if kind == "vit" else 10.0, lambda_reg=1.0,
                            forget_loss="mean_inverse", eps=1e-6, alpha_clamp=None)
    elif kind == "vit":
        # ViT qkv gates move slowly under the CNN lambdas (docs/results/calibration_mnist_cpu.md, section 3): the
        # paper's lambda1 = 100 for ViTs, balanced by a retain weight of 200 (ViT-T at 98.08 %, full MNIST test,
        # 300 steps: 200 -> Acc_r drop 1.47 / Acc_f 0.80; 100 at 200 steps -> 2.36 / 0.93; docs/results/
        # reproduce_mnist_cpu/README.md).
        cfg = UntrainConfig(lambda_retain=200.0, lambda_forget=100.0)
    else:
        cfg = UntrainConfig()
    known = {f.name for f in fields(UntrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown untraining option(s) {sorted(unknown)}")
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k != "recipe"})
    if cfg.alpha_clamp is not None and cfg.alpha_clamp <= 0:
        cfg.alpha_clamp = None
    return cfg


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
    """The loss of docs/method.md section 3 on one expanded batch; returns (loss, {"forget_ce", "retain_ce", "reg", ...}).
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
    Forget sets compose with the model's own ``set_composition`` (:func:`untrain` sets it from the config, so the
    gates learn the composition they are saved and served with). Returns the loss parts (fetched from the device in one copy: the step's only host sync)."""
    inputs, rows, labels, nf = _expand(x, y, num_classes, cfg, generator)
    inputs, rows, labels, nf = _shard_expanded(inputs, rows, labels, nf, info or DistInfo())
    wanted = cfg.lambda_feature > 0
    with autocast(device, cfg.amp), _head_input(model, wanted) as captured:
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
    """The random rows (and sets) of one step: a function of (seed, epoch, step), so a resumed run draws the same."""
    return torch.Generator().manual_seed(derive_seed(seed, "untrain-rows", epoch, step))


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
        with autocast(device, cfg.amp), _head_input(wf, wanted) as captured:
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
    # the gates learn to compose this way for sets; the model keeps it (saved with the gates by save_filters)
    wf.set_composition = getattr(cfg, "set_composition", None) or DEFAULT_COMPOSITION
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
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, "untrain-order", epoch)))
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


def saved_options(run: Run) -> dict | None:
    """The untraining options of the run's gates, completed with the defaults of options added since (None: no
    gates), comparable with :func:`options_key`."""
    saved = run.untrain_options()
    if saved is None:
        return None
    full = with_defaults(UntrainConfig, saved)
    full.pop("num_workers", None)
    return full


def config_for(run: Run, **options) -> UntrainConfig:
    """The full untraining options for ``run``: ``options`` over the recipe's values (``recipe``, default tuned;
    None = the recipe's value), for the run's kind of backbone (:attr:`WFModel.kind`)."""
    wf = run.wrapped(gates=False, targets=options.get("targets") or "auto")
    try:
        return recipe(options.get("recipe") or "tuned", wf.kind, **options)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def run(run: Run, cfg: UntrainConfig | None = None, *, force: bool = False, resume: bool = False,
        progress: bool = True) -> dict | None:
    """The ``untrain`` stage: train the gates of ``run`` for every class in one round and commit them with their
    results (``filters.safetensors``, ``untrain_summary.json``, ``results.{json,md}``). ``cfg``: a full
    :class:`UntrainConfig` (:func:`config_for` builds one from a recipe); default: the tuned recipe. Gates made
    with other options are replaced only with ``force``, and only once the new ones are trained; a damaged filters
    file is replaced with ``force``; an interrupted untraining is continued with ``resume`` or discarded with
    ``force``, never silently. Returns the results (None on non-main ranks)."""
    cfg = cfg or config_for(run)
    key = options_key(cfg)
    try:
        current = saved_options(run)
    except files.CorruptFileError:
        if not force:
            raise
        # --force replaces the gates whatever they hold; a damaged file holds nothing worth keeping
        run.say(f"{run.run_dir / FILTERS} is damaged or truncated; --force: untraining anew to replace it")
        current = None
    if current is not None and current != key and not force:
        raise RunError(f"{run.run_dir} already holds gates untrained with other options "
                       f"({differences(current, key)}); pass --force to replace them (the old ones stay until "
                       f"the new ones are trained), or copy the run folder")
    state = run.run_dir / UNTRAIN_STATE
    if resume and state.exists() and read_state_meta(state).get("config") != key:
        raise RunError(f"--resume: the interrupted untraining in {run.run_dir} used other options "
                       f"({differences(read_state_meta(state).get('config') or {}, key)}); resume with those, "
                       f"or start over without --resume")
    if current == key:
        done = run.results()
        if done is not None:
            run.say(f"{run.run_dir}: already untrained with these options; results in {run.run_dir / RESULTS_MD}")
            return {**done, "markdown": (run.run_dir / RESULTS_MD).read_text(encoding="utf-8")}
    if not resume and not force and state.exists():
        # a killed untraining left its state: starting over silently would throw that work away
        raise RunError(f"{run.run_dir} holds an interrupted untraining ({state.name}): pass --resume to "
                       f"continue it (with the same options), or --force to discard it and start over")
    wf = run.wrapped(gates=False, targets=cfg.targets)
    run.say(f"{run.run_dir}: {wf.plan.one_line(wf.num_classes)}")
    bundle = run.data
    try:  # the real model on one real sample: an unusable backend fails here, before any training
        with torch.no_grad():
            wf(bundle.train[0][0][None].to(run.device), forget=0)
    except BackendUnavailableError as exc:
        raise RunError(one_line(exc)) from None
    if current == key and (run.run_dir / UNTRAIN_SUMMARY).exists():
        # the gates exist, only their results are missing (deleted by hand): evaluate them, no retraining
        load_filters(wf, run.run_dir / FILTERS)
        summary = files.read_json(run.run_dir / UNTRAIN_SUMMARY)
        return _commit(run, wf, cfg, summary, new_gates=False, progress=progress)
    run.say(f"untraining {len(wf.layer_names)} filtered layers ({wf.num_filter_parameters()} gate parameters) "
            f"for all {run.num_classes} classes, {cfg.recipe} recipe, on {run.device}")
    try:
        summary = untrain(wf, bundle.train, bundle.val, cfg, run.device, state_path=state, resume=resume,
                          info=run.info, progress=progress)
    except BackendUnavailableError as exc:
        raise RunError(one_line(exc)) from None
    if not run.info.is_main:
        return None
    run.say(f"{summary['stopped']} after {summary['steps']} steps ({summary['seconds']:.0f} s)")
    return _commit(run, wf, cfg, summary, new_gates=True, progress=progress)


def _commit(run: Run, wf: WFModel, cfg: UntrainConfig, summary: dict, new_gates: bool, progress: bool) -> dict:
    """Measure Acc_f / Acc_r of the original and of the gates on the test set and commit the gates (when new) with
    their summary and results; what described older gates leaves in the same step."""
    key = options_key(cfg)
    stamp = new_stamp() if new_gates else run.filters_meta()["stamp"]
    wf.eval()
    loader = make_loader(run.data.test, 512)
    classes = range(run.num_classes)
    orig_acc = metrics.accuracy_forget_retain_shared(run.original_model(), loader, classes, run.device)
    wf_acc = metrics.accuracy_forget_retain(lambda c: (lambda x: wf(x, forget=c)), loader, classes, run.device,
                                            progress=progress)
    results = {"run": str(run.run_dir), "model": run.config["model"], "dataset": run.config["dataset"],
               "recipe": cfg.recipe, "untrain_seconds": summary["seconds"], "filters_stamp": stamp,
               "untrain": key, "original": orig_acc, "wf_net": wf_acc}
    summary = {**summary, "filters_stamp": stamp, "untrain": key}
    md = accuracy_md(run.class_names, orig_acc, wf_acc, cfg.recipe, summary["seconds"], run.config["dataset"],
                     run.config["model"])
    new = [UNTRAIN_SUMMARY, RESULTS_JSON, RESULTS_MD]
    stale = []
    if new_gates:  # what described the old gates leaves as the new ones land
        stale = [*run.gate_derived(), UNTRAIN_STATE]
        meta = {"stamp": stamp, "original_stamp": run.original_info()["stamp"], "untrain": key,
                "dataset": run.config["dataset"]}
        save_filters(wf, run.stage_path(FILTERS), meta)
        new.append(FILTERS)
    files.write_json(run.stage_path(UNTRAIN_SUMMARY), summary)
    files.write_json(run.stage_path(RESULTS_JSON), results)
    files.write_text(run.stage_path(RESULTS_MD), md)
    run.commit(new=new, stale=stale)
    run.say(f"saved {run.run_dir / FILTERS}")
    results["markdown"] = md
    return results
