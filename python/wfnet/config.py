"""The option helpers every stage builds its configuration dataclass with, and the run's identity (:class:`DataConfig`).

Each stage module owns its own configuration dataclass (:class:`wfnet.train.TrainConfig`,
:class:`wfnet.untrain.UntrainConfig`, :class:`wfnet.baselines.BaselineConfig`, :class:`wfnet.evaluate.EvalConfig`,
:class:`wfnet.audit.AuditConfig`, :class:`wfnet.explain.ExplainConfig`); each field carries its help text in
``field(metadata={"help": ...})`` (:func:`opt`), and :mod:`wfnet.cli` turns the fields into ``--option-name`` flags,
so a field is declared once and appears in ``--help`` with its default.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .models import MODEL_NAMES

__all__ = ["DATASET_NAMES", "DataConfig", "opt", "opt_list", "with_defaults"]

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagenet", "imagefolder")


def opt(default, help: str, choices=None, flag: bool = True):
    """A dataclass field with its command-line help (``choices`` restricts the values; ``flag=False``: not an
    option of the command line)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def opt_list(help: str, choices=None):
    """A list-valued field (comma-separated on the command line); None = the command's default set."""
    return field(default=None, metadata={"help": help, "choices": choices, "flag": True, "csv": True})


@dataclass
class DataConfig:
    """What identifies a run: the model and the data it is trained on."""
    model: str = opt("small_cnn", f"{', '.join(MODEL_NAMES)}, or any torchvision / timm classification model name")
    dataset: str = opt("digits", "digits is embedded (no download); mnist, cifar10, imagenet and imagefolder read "
                                 "--data-root (imagefolder: ROOT/train/<class>/*.png and ROOT/val/ or ROOT/test/ "
                                 "likewise; see the README)", choices=DATASET_NAMES)
    data_root: str | None = opt(None, "folder holding the dataset (not needed for digits; default: $WFNET_DATA_ROOT)")
    download: bool = opt(False, "download mnist / cifar10 into --data-root when missing")
    image_size: int | None = opt(None, "input side in pixels (default: the dataset's, raised to the model's minimum)")
    patch_size: int | None = opt(None, "ViT patch size (default: 4 for inputs of 64 px or less, else 16)")
    stem_stride: int | None = opt(None, "stride of ResNet's 3x3 first conv on inputs of 64 px or less (default 1; 2 "
                                        "halves every feature map: ~4x cheaper)")
    augment: bool = opt(False, "random crop / flip augmentation when training (cifar10, image folders)")
    train_limit: int | None = opt(None, "train on a fixed random subset of this many samples (small machines)")
    test_limit: int | None = opt(None, "evaluate on a fixed random subset of this many test samples")
    exclude_class: int | None = opt(None, "train without this class (a retrained-without-c model)")


def with_defaults(cls, saved: dict) -> dict:
    """Options saved by an older wfnet, completed with the defaults of fields added since (so a run folder made
    before an option existed still compares equal to the same options made now)."""
    return {**{f.name: f.default for f in fields(cls)}, **saved}


