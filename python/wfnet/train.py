"""Training the original classifier (and the retrained-without-class-c baseline): ``wfnet train``.

Plain supervised training: SGD with momentum and a cosine schedule (or Adam), cross-entropy, seeded data order,
one atomic checkpoint per epoch (model + optimizer + epoch) so ``resume=True`` continues a killed run, data-parallel
under torchrun (DistributedSampler + DDP), and the final test accuracy.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import load_state, optimizer_from_flat, optimizer_to_flat, save_state
from .config import TrainConfig
from .distributed import DistInfo
from .metrics import accuracy

__all__ = ["TrainConfig", "train_classifier", "make_loader"]


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                info: DistInfo | None = None, epoch: int = 0) -> DataLoader:
    """A DataLoader with a seeded order; under torchrun each rank gets its DistributedSampler shard."""
    if info is not None and info.enabled and shuffle:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, info.world_size, info.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=batch_size // info.world_size, sampler=sampler, num_workers=num_workers)
    g = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      num_workers=num_workers)


def _optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd' or 'adam'")


def train_classifier(model: nn.Module, train_ds: Dataset, test_ds: Dataset, cfg: TrainConfig, device,
                     checkpoint: str | os.PathLike | None = None, resume: bool = False,
                     info: DistInfo | None = None, progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place; returns {"test_acc", "epochs", "history"}.

    ``checkpoint``: where the per-epoch training state goes (and is resumed from with ``resume=True``).
    """
    info = info or DistInfo()
    if cfg.epochs is None:
        raise ValueError("TrainConfig.epochs is not set")
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = _optimizer(model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(cfg.epochs * steps_per_epoch, 1), 1.0))))
    start_epoch, history = 0, []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        tensors, meta = load_state(checkpoint)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_flat(opt, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start_epoch, history = meta["epoch"], meta["history"]
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.num_workers, info, epoch)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and info.is_main),
                   leave=False)
        total_loss = n = 0
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * y.numel()
            n += y.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total_loss / max(n, 1)})
        if checkpoint is not None and info.is_main:
            opt_tensors, opt_meta = optimizer_to_flat(opt)
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors.update(opt_tensors)
            save_state(checkpoint, tensors, {"epoch": epoch + 1, "history": history, "optimizer": opt_meta,
                                             "scheduler": sched.state_dict(), "config": asdict(cfg)})
    model.eval()
    test_acc = accuracy(model, make_loader(test_ds, 512), device)
    return {"test_acc": test_acc, "epochs": cfg.epochs, "history": history}

