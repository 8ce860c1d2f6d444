"""Every option of the experiment commands, in one place: the names (models, datasets, backends, metrics,
baselines, recipes) and the configuration dataclasses the ``wfnet`` command builds its options from.

Each field carries its help text in ``field(metadata={"help": ...})``; :mod:`wfnet.cli` turns the fields into
``--option-name`` flags, so a field is declared once and appears in ``--help`` with its default. This module imports
nothing heavy, so ``wfnet --help`` answers without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

__all__ = ["MODEL_NAMES", "DATASET_NAMES", "METRICS", "AUDIT_METRICS", "BASELINE_METHODS", "RECIPES", "DataConfig", "TrainConfig",
           "UntrainConfig", "BaselineConfig", "EvalConfig", "ExplainConfig", "recipe", "default_train_epochs", "with_defaults"]

MODEL_NAMES = ("small_cnn", "vgg16", "vgg16_bn", "resnet18", "vit_tiny", "vit_small")
DATASET_NAMES = ("digits", "mnist", "cifar10", "imagenet", "imagefolder")
METRICS = ("acc", "zrf", "rt", "insdel")
AUDIT_METRICS = ("mia", "probe", "relearn_fewshot")  # the unlearning audit (wfnet.audit), on request
BASELINE_METHODS = ("retrain", "random-labels", "negative-gradients")
RECIPES = ("paper", "tuned")


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
                                 "--data-root", choices=DATASET_NAMES)
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
    """The ``paper`` or ``tuned`` recipe for a ``cnn`` or ``vit`` backbone, with overrides (None = keep the recipe's
    value; an ``alpha_clamp`` of 0 or less = no clamp)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    if kind not in ("cnn", "vit"):
        raise ValueError(f"kind must be 'cnn' or 'vit', got {kind!r}")
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


@dataclass
class BaselineConfig:
    """The per-class baselines (``wfnet baselines``); ``retrain`` uses the run's training options instead."""
    epochs: int = opt(1, "fine-tuning passes of random-labels / negative-gradients")
    lr: float = opt(0.01, "fine-tuning learning rate (SGD, momentum 0.9)")
    batch_size: int = opt(128, "fine-tuning mini-batch size")
    max_steps: int | None = opt(None, "random-labels / negative-gradients: optimizer steps at most per class "
                                      "(default: the full epochs)")
    seed: int = opt(0, "seed of the data order and of the random labels")


@dataclass
class EvalConfig:
    """Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion): ``wfnet evaluate``."""
    metrics: list[str] | None = opt_list(f"comma-separated subset of {','.join(METRICS + AUDIT_METRICS)} (default: "
                                         f"{','.join(METRICS)}; the audit metrics {','.join(AUDIT_METRICS)} on request, "
                                         f"written to eval/audit.md)", METRICS + AUDIT_METRICS)
    methods: list[str] | None = opt_list("comma-separated subset of original, wfnet and the baselines present "
                                    "(default: all)")
    classes: list[int] | None = opt_list("comma-separated class ids (default: all)")
    test_limit: int | None = opt(None, "evaluate on a fixed random subset of this many test images (default: the "
                                       "whole test set; the tables say which)")
    rt_max_epochs: int = opt(100, "relearn-time cap in epochs ('never' beyond)")
    rt_samples: int = opt(500, "random training samples per relearn epoch")
    rt_lr: float = opt(0.01, "relearn SGD learning rate")
    rt_batch_size: int = opt(64, "relearn mini-batch size")
    rt_seed: int = opt(0, "seed of the relearn samples")
    insdel_steps: int = opt(21, "points on the insertion / deletion curves")
    zrf_seed: int = opt(12345, "seed of the random network ZRF compares against")
    batch_size: int = opt(256, "evaluation batch size")
    audit_samples: int = opt(1000, "audit: samples per set (MIA members / non-members / targets, probe fit)")
    audit_shots: list[int] | None = opt_list("audit: images of the class per k-shot relearning attack (default: 10,50)")
    audit_steps: int = opt(50, "audit: SGD steps of each relearning attack")
    hard_threshold: float = opt(0.5, "audit: gate threshold of the hard export it also audits")


@dataclass
class ExplainConfig:
    """Filter maps, gate heatmaps and insertion / deletion curves: ``wfnet explain``."""
    layers: list[str] | None = opt_list("comma-separated filtered layer names (default: the middle and the last one)")
    top_k: int = opt(10, "channels per class in the filter maps")
    min_classes: int = opt(2, "a channel is drawn when it is in the top-k of at least this many classes")
    max_classes: int = opt(20, "classes drawn in the filter maps")
    insdel_steps: int = opt(21, "points on the insertion / deletion curves")
    test_limit: int | None = opt(None, "curves on the fixed random test subset of `wfnet evaluate --test-limit` "
                                       "(default: the whole test set)")
