"""Datasets by name, with a fixed train / validation split for early stopping.

* ``digits`` (default, embedded): scikit-learn's 1,797 handwritten 8x8 digits, shipped inside scikit-learn, so it
  works on a machine with no network. Upscaled (bilinear) to ``image_size`` (default 28) so the backbones run; a
  fixed stratified 75/25 train/test split (seed 0).
* ``mnist``: torchvision's MNIST from ``root`` (``root/MNIST/raw``); ``download=True`` only when asked.
* ``cifar10``: torchvision's CIFAR-10 from ``root`` (``root/cifar-10-batches-py``); random crop + flip for training
  when ``augment=True``.
* ``imagenet``: ``root/train`` and ``root/val`` as ImageFolders; the test set is the paper's evaluation subset of 5
  validation images per class, drawn with a fixed seed.
* ``imagefolder``: any ``root/train`` + ``root/val`` (or ``root/test``) folders of class sub-folders.

The validation set is a fixed, seeded ``val_fraction`` of the training set (it is removed from training).
Small datasets (digits, MNIST, CIFAR-10 without augmentation) are held as tensors in memory for speed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DATASET_NAMES
from .seeds import derive_seed

__all__ = ["DataBundle", "load_dataset", "DATASET_NAMES", "default_image_size", "labels_of"]

_NATIVE = {"digits": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "imagenet": (3, 224), "imagefolder": (3, 224)}
_MNIST_STATS = (0.1307, 0.3081)
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    in_chans: int
    image_size: int


def default_image_size(name: str) -> int:
    return _NATIVE.get(name, (3, 224))[1]


def labels_of(ds: Dataset) -> torch.Tensor:
    """All labels [N] (int64, CPU) of a dataset of (input, label) pairs, without loading inputs where the dataset
    allows it (tensor datasets, ``targets`` / ``labels`` attributes, subsets of those). The one labels helper."""
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1].reshape(-1).long().cpu()
    for attr in ("targets", "labels"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return torch.as_tensor(values).reshape(-1).long()
    from torch.utils.data import DataLoader  # generic datasets: one batched pass (inputs are loaded and dropped)

    labels = [torch.as_tensor(b[1]).reshape(-1).long() for b in DataLoader(ds, batch_size=1024)]
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def _split(ds: Dataset, val_fraction: float, seed: int):
    n = len(ds)
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, sorted(perm[n_val:])), Subset(ds, sorted(perm[:n_val]))


def _to_tensor_images(x: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """uint8/float [N, H, W] or [N, C, H, W] in [0, 1] -> normalised float32 [N, C, S, S]."""
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _require_root(root, name: str, expect: str) -> Path:
    if root is None:
        root = os.environ.get("WFNET_DATA_ROOT")
    if root is None:
        raise FileNotFoundError(f"dataset {name!r} needs --data-root (or WFNET_DATA_ROOT): a folder holding {expect}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist (dataset {name!r} expects {expect} there)")
    return root


def _digits(image_size: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(d.images).float() / 16.0  # 8x8 values 0..16
    labels = torch.from_numpy(d.target).long()
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=0.25, random_state=0,
                                           stratify=d.target)
    x = _to_tensor_images(images, image_size, (0.3,), (0.37,))
    train = TensorDataset(x[idx_train], labels[idx_train])
    test = TensorDataset(x[idx_test], labels[idx_test])
    return train, test, [str(i) for i in range(10)], 1


def _mnist(root, image_size: int, download: bool):
    from torchvision.datasets import MNIST

    root = _require_root(root, "mnist", "MNIST/raw (torchvision layout)")
    try:
        tr, te = MNIST(str(root), train=True, download=download), MNIST(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"MNIST not found under {root}/MNIST/raw ({exc}); pass --download to fetch it") from exc

    def conv(ds):
        return TensorDataset(_to_tensor_images(ds.data.float() / 255.0, image_size, *_MNIST_STATS),
                             ds.targets.clone().long())

    return conv(tr), conv(te), [str(i) for i in range(10)], 1


def _cifar10(root, image_size: int, download: bool, augment: bool):
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    root = _require_root(root, "cifar10", "cifar-10-batches-py")
    norm = [T.ToTensor(), T.Normalize(*_CIFAR_STATS)]
    resize = [] if image_size == 32 else [T.Resize(image_size)]
    train_tf = T.Compose(resize + ([T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
                                   if augment else []) + norm)
    test_tf = T.Compose(resize + norm)
    try:
        tr = CIFAR10(str(root), train=True, download=download, transform=train_tf)
        te = CIFAR10(str(root), train=False, download=download, transform=test_tf)
    except RuntimeError as exc:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} ({exc}); pass --download to fetch it") from exc
    return tr, te, list(tr.classes), 3


def _folders(root, name: str, image_size: int, augment: bool, per_class_test: int | None, seed: int):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = _require_root(root, name, "train/ and val/ (or test/) folders of class sub-folders")
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise FileNotFoundError(f"{root} must contain train/ and val/ (or test/) folders of class sub-folders")
    resize = int(round(image_size * 256 / 224))
    norm = [T.ToTensor(), T.Normalize(*_IMAGENET_STATS)]
    train_tf = T.Compose(([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if augment
                          else [T.Resize(resize), T.CenterCrop(image_size)]) + norm)
    test_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size)] + norm)
    tr = ImageFolder(str(root / "train"), transform=train_tf)
    te = ImageFolder(str(test_dir), transform=test_tf)
    if te.classes != tr.classes:
        raise ValueError(f"{root}: train/ and {test_dir.name}/ have different class folders")
    if per_class_test is not None:
        # The paper's ImageNet evaluation subset: a fixed, seeded choice of `per_class_test` images per class.
        targets = torch.as_tensor(te.targets)
        g = torch.Generator().manual_seed(seed)
        keep = []
        for c in range(len(te.classes)):
            idx = (targets == c).nonzero().flatten()
            keep += idx[torch.randperm(len(idx), generator=g)[:per_class_test]].tolist()
        te = Subset(te, sorted(keep))
    return tr, te, list(tr.classes), 3


def load_dataset(name: str = "digits", root=None, image_size: int | None = None, download: bool = False,
                 val_fraction: float = 0.1, seed: int = 0, augment: bool = False,
                 exclude_class: int | None = None, train_limit: int | None = None,
                 test_limit: int | None = None) -> DataBundle:
    """Load dataset ``name`` (see the module docstring) with a fixed seeded validation split.

    ``exclude_class`` drops that class from train and validation (for the retrained-without-c baseline); the test
    set keeps every class.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)}")
    image_size = image_size or default_image_size(name)
    if name == "digits":
        train, test, classes, chans = _digits(image_size)
    elif name == "mnist":
        train, test, classes, chans = _mnist(root, image_size, download)
    elif name == "cifar10":
        train, test, classes, chans = _cifar10(root, image_size, download, augment)
    else:
        train, test, classes, chans = _folders(root, name, image_size, augment,
                                               5 if name == "imagenet" else None, seed)
    train = _limit(train, train_limit, derive_seed(seed, "subset", "train"))
    test = _limit(test, test_limit, derive_seed(seed, "subset", "test"))
    train, val = _split(train, val_fraction, seed)
    if exclude_class is not None:
        if not 0 <= exclude_class < len(classes):
            raise ValueError(f"exclude_class {exclude_class} is out of range: num_classes={len(classes)}")
        train = _without(train, exclude_class)
        val = _without(val, exclude_class)
    return DataBundle(name, train, val, test, len(classes), classes, chans, image_size)


def _limit(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``n`` samples (``seed``: derived per split by the caller)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"a sample limit must be >= 1, got {n}")
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, sorted(keep.tolist()))


def _without(ds: Subset, c: int) -> Subset:
    labels = labels_of(ds)
    keep = (labels != c).nonzero().flatten().tolist()
    return Subset(ds.dataset, [ds.indices[i] for i in keep])
