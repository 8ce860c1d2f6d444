"""Run folders: one folder per experiment holds everything a run produced, and :class:`Run` reads it back.

    <run>/config.json                 effective configuration (model, dataset, data, train, untrain sections)
    <run>/original.safetensors        the trained original model (state_dict)
    <run>/train_state.safetensors     resumable training state of the original model
    <run>/filters.safetensors         the trained gates (wfnet.save_filters)
    <run>/untrain_state.safetensors   resumable untraining state
    <run>/untrain_summary.json        validation history, stop reason, seconds
    <run>/results.json, results.md    Acc_f / Acc_r per class and means (Table 1, accuracy columns)
    <run>/baselines/<method>/class_<c>.safetensors, summary.json     per-class baseline models and their timing
    <run>/eval/, <run>/explain/       written by ``wfnet evaluate`` / ``wfnet explain``

Every file is written atomically. ``config.json`` identifies the run: a command pointed at a folder holding a
different run refuses to overwrite it.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_model_weights
from .data import DataBundle, load_dataset
from .model import WFModel, wrap
from .models import build_model, min_image_size
from .serialization import load_filters, write_text

__all__ = ["Run", "write_json", "read_json", "model_spec", "BASELINE_METHODS"]

BASELINE_METHODS = ("retrain", "random-labels", "negative-gradients")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def model_spec(model: str, dataset: str, image_size: int | None) -> dict:
    """Resolve the image size for a (model, dataset) pair: the dataset's native size, raised to the model's minimum."""
    from .data import default_image_size

    size = image_size or default_image_size(dataset)
    return {"model": model, "dataset": dataset, "image_size": max(size, min_image_size(model))}


class Run:
    """A run folder (see the module docstring), with lazy access to its data and models."""

    def __init__(self, run_dir, device: str | torch.device | None = None, data_root: str | None = None):
        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{self.run_dir} is not a wfnet run folder (no config.json); create one with "
                                    f"`wfnet train` or `wfnet demo`")
        self.config = read_json(cfg_path)
        if data_root is not None:
            self.config["data_root"] = data_root
        self.device = torch.device(device or self.config.get("device") or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            self.device = torch.device("cpu")
        self.num_classes = int(self.config["num_classes"])
        self.class_names = list(self.config.get("class_names") or [str(i) for i in range(self.num_classes)])

    @cached_property
    def data(self) -> DataBundle:
        c = self.config
        return load_dataset(c["dataset"], root=c.get("data_root"), image_size=c["image_size"],
                            val_fraction=c.get("val_fraction", 0.1), seed=c.get("data_seed", 0),
                            train_limit=c.get("train_limit"), test_limit=c.get("test_limit"))

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh, randomly initialised model of the run's architecture (seeded), on the device, in eval mode."""
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = build_model(c["model"], self.num_classes, c["in_chans"], c["image_size"])
        return m.to(self.device).eval()

    def original_model(self) -> nn.Module:
        path = self.run_dir / "original.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: train the original model first (`wfnet train`)")
        m = self.build_model()
        load_model_weights(m, path)
        return m.to(self.device).eval()

    def wf_model(self) -> WFModel:
        path = self.run_dir / "filters.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: untrain first (`wfnet untrain {self.run_dir}`)")
        wf = wrap(self.original_model(), self.num_classes, targets=self.config.get("targets", "auto"))
        load_filters(wf, path)
        return wf.to(self.device).eval()

    def baseline_dir(self, method: str) -> Path:
        return self.run_dir / "baselines" / method

    def baseline_methods(self) -> list[str]:
        return [m for m in BASELINE_METHODS if self.baseline_classes(m)]

    def baseline_classes(self, method: str) -> list[int]:
        d = self.baseline_dir(method)
        return sorted(int(p.stem.split("_")[1]) for p in d.glob("class_*.safetensors")) if d.exists() else []

    def baseline_model(self, method: str, c: int) -> nn.Module:
        path = self.baseline_dir(method) / f"class_{c}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run `wfnet baselines {self.run_dir} --methods {method}`")
        m = self.build_model()
        load_model_weights(m, path)
        return m.to(self.device).eval()
