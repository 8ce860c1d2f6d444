"""Training the original classifier (and the retrained-without-class-c baseline): ``wfnet train``.

Plain supervised training: SGD with Nesterov momentum, Adam or AdamW; a cosine or a one-cycle schedule; optional
random-shift augmentation and bfloat16 autocast; cross-entropy, seeded data order, one atomic checkpoint per epoch
(model + optimizer + scheduler + epoch) so ``resume=True`` continues a killed run, data-parallel under torchrun
(DistributedSampler + DDP), and the final test accuracy (always in fp32).

The MNIST recipes of ``wfnet reproduce --profile cpu`` (one-cycle; shift +-2 px and bf16 for the CNNs; AdamW without
shift for the ViTs) were chosen from measurements: docs/results/calibration_mnist_cpu.md.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import load_state, optimizer_from_flat, optimizer_to_flat, save_model, save_state
from .config import opt
from .distributed import DistInfo
from .errors import RunError
from .metrics import accuracy
from .models import build_model
from .run import ORIGINAL, TRAIN_STATE, Run, new_stamp
from .seeds import derive_seed

__all__ = ["TrainConfig", "run", "train_classifier", "make_loader", "autocast", "random_shift",
           "default_train_epochs", "drop_single_last"]


def default_train_epochs(dataset: str) -> int:
    return 15 if dataset == "digits" else 10


@dataclass
class TrainConfig:
    """Training of the original classifier (``wfnet train``)."""
    epochs: int | None = opt(None, "training epochs (default: 15 for digits, else 10)")
    batch_size: int = opt(128, "mini-batch size")
    lr: float = opt(0.05, "learning rate (the peak of the onecycle schedule)")
    optimizer: str = opt("sgd", "sgd (momentum 0.9, Nesterov), adam or adamw", choices=("sgd", "adam", "adamw"))
    weight_decay: float = opt(5e-4, "weight decay")
    schedule: str = opt("cosine", "cosine (from lr to 0) or onecycle (warm-up from lr/25 to lr, cosine down to "
                                  "lr/25000; SGD momentum cycled 0.95 -> 0.85)", choices=("cosine", "onecycle"))
    warmup: float = opt(0.15, "onecycle: fraction of the steps spent warming up")
    shift: int = opt(0, "augmentation: random translation of every training image by up to this many pixels "
                        "(background fill)")
    amp: str = opt("off", "bf16: train under bfloat16 autocast (2.4x faster VGG-16-BN steps on an AVX-512-BF16 "
                          "CPU); evaluation stays fp32", choices=("off", "bf16"))
    compile: bool = opt(False, "run the training steps through torch.compile (1.3x faster ViT-T steps on the CPU, "
                               "measured; none for ViT-S); the saved model and the evaluation are the eager model's")
    seed: int = opt(0, "seed of the initialisation and the data order")
    num_workers: int = opt(0, "DataLoader worker processes", flag=False)


def autocast(device, amp: str):
    """The precision context of a training forward: ``"bf16"`` = bfloat16 autocast on the device, ``"off"`` = none."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown amp mode {amp!r}: use 'off' or 'bf16'")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image of the batch ``x`` [B, C, H, W] by its own random integer offset in
    [-max_shift, max_shift] along each axis; uncovered pixels take the batch's minimum (the normalised background)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w)
    batch = torch.arange(b).view(b, 1, 1, 1)
    chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch, chan, rows, cols]


def drop_single_last(n: int, batch_size: int) -> bool:
    """Whether a training loader over ``n`` samples drops its last batch: only when that batch would hold ONE
    sample (and it is not the only batch). BatchNorm in training mode cannot normalise one value per channel
    ("Expected more than 1 value per channel"), e.g. ImageFolder 3 x 30 images with --batch-size 16 after the
    validation split; dropping one sample per epoch (a different one each epoch, the order is shuffled) costs
    nothing measurable."""
    return n > batch_size and n % batch_size == 1


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                info: DistInfo | None = None, epoch: int = 0) -> DataLoader:
    """A DataLoader with a seeded order; under torchrun each rank gets its DistributedSampler shard. A shuffled
    (training) loader drops a last batch of one sample (:func:`drop_single_last`)."""
    if info is not None and info.enabled and shuffle:
        sampler = DistributedSampler(ds, info.world_size, info.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        bs = batch_size // info.world_size
        return DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=num_workers,
                          drop_last=drop_single_last(len(sampler), bs))
    g = torch.Generator().manual_seed(derive_seed(seed, "data-order", epoch))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      num_workers=num_workers, drop_last=shuffle and drop_single_last(len(ds), batch_size))


def _optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd', 'adam' or 'adamw'")


def _scheduler(opt, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total_steps, 1), 1.0))))
    if cfg.schedule == "onecycle":
        if not 0 < cfg.warmup < 1:
            raise ValueError(f"warmup must be a fraction in (0, 1), got {cfg.warmup}")
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=cfg.warmup, anneal_strategy="cos",
            div_factor=25.0, final_div_factor=1e3, cycle_momentum=cfg.optimizer == "sgd")
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'cosine' or 'onecycle'")


def train_classifier(model: nn.Module, train_ds: Dataset, test_ds: Dataset, cfg: TrainConfig, device,
                     checkpoint: str | os.PathLike | None = None, resume: bool = False,
                     info: DistInfo | None = None, progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place; returns {"test_acc", "epochs", "history", "seconds"}.

    ``checkpoint``: where the per-epoch training state goes (and is resumed from with ``resume=True``).
    ``seconds`` is the wall time of the whole training, the epochs of an interrupted process included (the state
    remembers them), so a resumed training reports what it cost, not only its last part; each history entry has
    its epoch's ``seconds``.
    """
    info = info or DistInfo()
    if cfg.epochs is None:
        raise ValueError("TrainConfig.epochs is not set")
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = _optimizer(model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    autocast(device, cfg.amp)  # an unknown mode fails here, before any work
    start_epoch, history, seconds_before = 0, [], 0.0
    t0 = time.time()
    if resume and checkpoint is not None and Path(checkpoint).exists():
        tensors, meta = load_state(checkpoint)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_flat(opt, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start_epoch, history = meta["epoch"], meta["history"]
        seconds_before = meta.get("seconds", 0.0)  # states written before this key existed count from here
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the compiled module shares the parameters: the state saved below stays the eager model's
        ddp = torch.compile(ddp)
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.time()
        model.train()
        loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.num_workers, info, epoch)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and info.is_main),
                   leave=False)
        total_loss = n = 0
        shift_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "shift", epoch))  # resume-safe
        for x, y in bar:
            x = random_shift(x, cfg.shift, shift_gen)
            x, y = x.to(device), y.to(device)
            with autocast(device, cfg.amp):
                out = ddp(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * y.numel()
            n += y.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total_loss / max(n, 1),
                        "seconds": round(time.time() - t_epoch, 1)})
        if checkpoint is not None and info.is_main:
            opt_tensors, opt_meta = optimizer_to_flat(opt)
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors.update(opt_tensors)
            save_state(checkpoint, tensors, {"epoch": epoch + 1, "history": history, "optimizer": opt_meta,
                                             "scheduler": sched.state_dict(), "config": asdict(cfg),
                                             "seconds": seconds_before + time.time() - t0})
    model.eval()
    test_acc = accuracy(model, make_loader(test_ds, 512), device)
    return {"test_acc": test_acc, "epochs": cfg.epochs, "history": history,
            "seconds": seconds_before + time.time() - t0}



def run(run: Run, cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> Run:
    """The ``train`` stage: train the original model of ``run`` (made by :meth:`Run.create`) with ``cfg`` and commit
    ``original.safetensors``. A folder that already holds this run's original model is left alone; one holding a
    different run is refused (:meth:`Run.claim`)."""
    cfg = replace(cfg, epochs=cfg.epochs or default_train_epochs(run.config["dataset"]))
    claimed = run.claim(asdict(cfg), asdict(TrainConfig()), resume=resume)
    c = run.config
    if claimed == "done":
        run.say(f"{run.run_dir}: the original model is already trained (test accuracy "
                f"{run.original_info().get('test_acc', float('nan')):.2f}%); nothing to do")
        return run
    try:
        torch.manual_seed(cfg.seed)  # the same initialisation as Run.build_model(seed=cfg.seed)
        model = build_model(c["model"], run.num_classes, c["in_chans"], c["image_size"],
                            patch_size=c.get("patch_size"), stem_stride=c.get("stem_stride"))
    except ValueError as exc:
        raise RunError(str(exc)) from None
    bundle = run.data
    run.say(f"training {c['model']} on {c['dataset']} ({len(bundle.train)} train / {len(bundle.val)} val / "
            f"{len(bundle.test)} test images, {c['image_size']} px) on {run.device}")
    t0 = time.time()
    res = train_classifier(model, bundle.train, bundle.test, cfg, run.device, checkpoint=run.run_dir / TRAIN_STATE,
                           resume=claimed == "resume", info=run.info, progress=progress)
    if run.info.is_main:
        meta = {"stamp": new_stamp(), "train": asdict(cfg), "test_acc": res["test_acc"],
                "seconds": res["seconds"]}  # the whole training, an interrupted process's epochs included
        save_model(model, run.stage_path(ORIGINAL), meta)
        run.commit(new=[ORIGINAL], stale=[TRAIN_STATE])
    resumed = f", {time.time() - t0:.0f} s in this process" if res["seconds"] > time.time() - t0 + 1 else ""
    run.say(f"test accuracy {res['test_acc']:.2f}% ({res['seconds']:.0f} s{resumed}); saved {run.run_dir / ORIGINAL}")
    return run
