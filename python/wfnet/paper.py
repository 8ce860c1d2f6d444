"""The paper's reported numbers (Poppi et al. 2024, Tables 1 and 2; docs/method.md section 5) as data.

Table 1 rows give Acc_r / Acc_f (in %), ZRF and RT; Table 2 rows give insertion / deletion AUCs. Lookups are by
(dataset, backbone), with forgiving name normalisation ("CIFAR-10", "cifar10"; "vgg16", "VGG-16", "vit_tiny...").

Scales: the paper prints ZRF as a percentage for MNIST and CIFAR-10 (48.0) but as a fraction for ImageNet (0.35).
Here ``zrf`` is ALWAYS a fraction in [0, 1] (48.0 -> 0.480), matching :func:`wfnet.metrics.zrf`. RT is kept as the
paper prints it: ``rt_mean`` (None where the paper writes ">100") and ``rt_never`` (classes never relearned);
the original model and every ImageNet row have no RT (None).
"""
from __future__ import annotations

import re

__all__ = ["TABLE1", "TABLE2", "normalise_dataset", "normalise_backbone", "normalise_method", "table1_rows",
           "table2_row", "METHOD_LABELS"]

# method key -> the paper's row label
METHOD_LABELS = {"original": "original", "retrain": "retrained", "random-labels": "random labels",
                 "negative-gradients": "negative gradients", "ssd": "SSD", "wfnet": "WF-Net"}

# (backbone, method) -> {dataset: (Acc_r, Acc_f, ZRF as printed, RT as printed or None)}
_T1 = {
    ("vgg16", "original"): {"mnist": (99.6, 99.6, 48.0, None), "cifar10": (93.0, 93.0, 48.3, None),
                            "imagenet": (71.2, 71.3, 0.35, None)},
    ("vgg16", "retrain"): {"mnist": (99.4, 0.0, 48.7, "74.5 (5)"), "cifar10": (89.9, 0.0, 50.1, "65.3 (5)")},
    ("vgg16", "random-labels"): {"mnist": (99.6, 0.0, 53.3, "40.3 (0)"), "cifar10": (88.7, 0.0, 52.5, "56.5 (5)")},
    ("vgg16", "negative-gradients"): {"mnist": (99.4, 0.0, 48.3, "24.6 (0)"),
                                      "cifar10": (89.4, 0.0, 51.6, "76.7 (7)")},
    ("vgg16", "wfnet"): {"mnist": (73.2, 0.0, 79.2, "27.6 (1)"), "cifar10": (80.2, 18.3, 57.4, "54.2 (5)"),
                         "imagenet": (64.1, 1.89, 0.53, None)},
    ("resnet18", "original"): {"mnist": (99.6, 99.6, 47.0, None), "cifar10": (93.9, 94.0, 48.0, None),
                               "imagenet": (70.5, 70.3, 0.35, None)},
    ("resnet18", "retrain"): {"mnist": (99.4, 0.0, 48.7, "43.6 (0)"), "cifar10": (90.5, 0.0, 51.4, ">100 (10)")},
    ("resnet18", "random-labels"): {"mnist": (99.4, 0.0, 57.1, "15.7 (0)"),
                                    "cifar10": (90.6, 0.0, 59.4, "21.6 (0)")},
    ("resnet18", "negative-gradients"): {"mnist": (99.2, 0.0, 52.1, "20.1 (0)"),
                                         "cifar10": (92.4, 0.0, 55.2, "31.3 (3)")},
    ("resnet18", "wfnet"): {"mnist": (94.0, 9.68, 63.1, "22.7 (0)"), "cifar10": (79.7, 9.25, 63.9, "94.3 (9)"),
                            "imagenet": (64.4, 1.47, 0.40, None)},
    ("vit_tiny", "original"): {"mnist": (98.9, 98.9, 47.2, None), "cifar10": (78.0, 78.0, 49.8, None),
                               "imagenet": (75.6, 75.5, 0.34, None)},
    ("vit_tiny", "retrain"): {"mnist": (99.0, 0.0, 50.2, "71.4 (7)"), "cifar10": (71.2, 0.0, 67.6, "52.2 (4)")},
    ("vit_tiny", "random-labels"): {"mnist": (98.3, 0.0, 48.7, "81.9 (8)"),
                                    "cifar10": (73.2, 0.0, 57.7, "83.5 (8)")},
    ("vit_tiny", "negative-gradients"): {"mnist": (98.4, 0.0, 54.6, "71.6 (7)"),
                                         "cifar10": (74.4, 0.0, 50.1, "81.7 (8)")},
    ("vit_tiny", "wfnet"): {"mnist": (93.5, 0.0, 47.4, ">100 (10)"), "cifar10": (73.5, 0.0, 59.8, ">100 (10)"),
                            "imagenet": (68.0, 2.51, 0.44, None)},
    ("vit_small", "original"): {"mnist": (99.0, 98.9, 47.1, None), "cifar10": (85.2, 85.2, 53.6, None),
                                "imagenet": (82.3, 82.2, 0.34, None)},
    ("vit_small", "retrain"): {"mnist": (99.0, 0.0, 49.5, "91.5 (8)"), "cifar10": (75.5, 0.0, 61.3, "51.1 (4)")},
    ("vit_small", "random-labels"): {"mnist": (99.5, 0.0, 50.4, "74.1 (7)"),
                                     "cifar10": (74.8, 0.0, 50.8, "75.0 (6)")},
    ("vit_small", "negative-gradients"): {"mnist": (99.6, 0.0, 52.3, "44.1 (4)"),
                                          "cifar10": (75.5, 0.0, 51.7, "61.7 (5)")},
    ("vit_small", "wfnet"): {"mnist": (94.0, 0.0, 48.0, "91.0 (9)"), "cifar10": (74.7, 0.0, 59.7, "81.1 (8)"),
                             "imagenet": (69.2, 9.46, 0.45, None)},
}

# backbone -> {dataset: (insertion, deletion)}
_T2 = {
    "vgg16": {"mnist": (0.78, 0.09), "cifar10": (0.79, 0.10), "imagenet": (0.73, 0.05)},
    "resnet18": {"mnist": (0.79, 0.05), "cifar10": (0.69, 0.06), "imagenet": (0.75, 0.04)},
    "vit_tiny": {"mnist": (0.90, 0.07), "cifar10": (0.88, 0.05), "imagenet": (0.60, 0.04)},
    "vit_small": {"mnist": (0.90, 0.08), "cifar10": (0.88, 0.14), "imagenet": (0.75, 0.04)},
}


def _parse_rt(rt: str | None):
    if rt is None:
        return None, None
    m = re.fullmatch(r"(>?)([\d.]+) \((\d+)\)", rt)
    return (None if m.group(1) else float(m.group(2))), int(m.group(3))


def _t1_entry(dataset, values) -> dict:
    acc_r, acc_f, zrf, rt = values
    rt_mean, rt_never = _parse_rt(rt)
    return {"acc_r": acc_r, "acc_f": acc_f, "zrf": zrf if dataset == "imagenet" else round(zrf / 100.0, 6),
            "rt": rt, "rt_mean": rt_mean, "rt_never": rt_never}


# TABLE1[(dataset, backbone)][method] -> {"acc_r", "acc_f", "zrf" (fraction), "rt" (as printed), "rt_mean", ...}
TABLE1: dict[tuple[str, str], dict[str, dict]] = {}
for (_bb, _method), _per_ds in _T1.items():
    for _ds, _vals in _per_ds.items():
        TABLE1.setdefault((_ds, _bb), {})[_method] = _t1_entry(_ds, _vals)

# TABLE2[(dataset, backbone)] -> {"insertion", "deletion"}  (WF-Net only)
TABLE2: dict[tuple[str, str], dict] = {(_ds, _bb): {"insertion": v[0], "deletion": v[1]}
                                       for _bb, _per_ds in _T2.items() for _ds, v in _per_ds.items()}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def normalise_dataset(name: str) -> str | None:
    """'MNIST' -> 'mnist', 'CIFAR-10' -> 'cifar10', 'ImageNet-1k' -> 'imagenet'; None for other datasets."""
    s = _squash(name)
    if s == "mnist":
        return "mnist"
    if s in ("cifar10",):
        return "cifar10"
    if s in ("imagenet", "imagenet1k", "ilsvrc2012", "imagenet2012"):
        return "imagenet"
    return None


def normalise_backbone(name: str) -> str | None:
    """'VGG-16'/'vgg16'/'vgg16_bn' -> 'vgg16', 'ResNet-18' -> 'resnet18', 'ViT-T'/'vit_tiny_patch16_224' ->
    'vit_tiny', 'ViT-S'/'vit_small_...' -> 'vit_small'; None for backbones the paper did not use."""
    s = _squash(name)
    if s.startswith("vgg16"):
        return "vgg16"
    if s.startswith("resnet18"):
        return "resnet18"
    if s in ("vitt", "vittiny") or s.startswith("vittiny") or s.startswith("deittiny"):
        return "vit_tiny"
    if s in ("vits", "vitsmall") or s.startswith("vitsmall") or s.startswith("deitsmall"):
        return "vit_small"
    return None


def normalise_method(name: str) -> str | None:
    """Map a method name ('retrain', 'retrained', 'random_labels', 'neg-grad', 'WF-Net', ...) to a Table 1 key."""
    s = _squash(name)
    table = {"original": "original", "retrain": "retrain", "retrained": "retrain", "randomlabels": "random-labels",
             "randomlabel": "random-labels", "negativegradients": "negative-gradients",
             "negativegradient": "negative-gradients", "neggrad": "negative-gradients", "ssd": "ssd", "wfnet": "wfnet"}
    return table.get(s)


def table1_rows(dataset: str, backbone: str) -> dict[str, dict] | None:
    """The paper's Table 1 rows (method -> values) for this dataset / backbone, or None if it has none."""
    ds, bb = normalise_dataset(dataset), normalise_backbone(backbone)
    return TABLE1.get((ds, bb)) if ds and bb else None


def table2_row(dataset: str, backbone: str) -> dict | None:
    """The paper's Table 2 entry {"insertion", "deletion"} for WF-Net on this dataset / backbone, or None."""
    ds, bb = normalise_dataset(dataset), normalise_backbone(backbone)
    return TABLE2.get((ds, bb)) if ds and bb else None
