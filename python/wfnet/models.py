"""Classifiers by name, adapted to the data: the paper's backbones plus a small CNN for the CPU demo.

* ``small_cnn``: three 3x3 conv blocks (32/64/128 channels, BatchNorm, ReLU, max-pool) and a linear head; all three
  convs are filtered. Fast enough to train and untrain on 2 CPU cores in seconds on the embedded digits.
* ``vgg16``, ``vgg16_bn``, ``resnet18`` (torchvision): for inputs of 64 px or less the stems are adapted the usual
  CIFAR way — ResNet-18 gets a 3x3 first conv (stride ``stem_stride``, default 1) and no max-pool; VGG-16 (with or
  without BatchNorm) keeps its 13 convs and gets a global-pool 512 -> num_classes head. Grey inputs get a first conv
  with ``in_chans`` inputs.
* ``vit_tiny``, ``vit_small`` (timm ``vit_tiny_patch16_224`` / ``vit_small_patch16_224``) with ``img_size`` set to the
  data and patch size ``patch_size`` (default 4 for inputs of 64 px or less, 16 otherwise).
* any other torchvision classification model name, or timm model name, built with ``num_classes`` (and
  ``in_chans`` / ``img_size`` for timm).

No weights are downloaded: models start random and are trained with ``wfnet train``.
"""
from __future__ import annotations

import torch.nn as nn

from dataclasses import dataclass
from typing import Callable

__all__ = ["build_model", "MODEL_NAMES", "MODELS", "ModelEntry", "register_model", "min_image_size"]

_SMALL_INPUT = 64  # at or below this many pixels, use the CIFAR-style stems / patch size 4


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head (docs/method.md section 7), with BatchNorm."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _first_conv(conv: nn.Conv2d, in_chans: int, **overrides) -> nn.Conv2d:
    kw = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
    kw.update(overrides)
    return nn.Conv2d(in_chans, conv.out_channels, **kw)


@dataclass(frozen=True)
class ModelEntry:
    """A named architecture: ``build(num_classes, in_chans, image_size, small, patch_size, stem_stride)`` returns the
    random model; the options it takes and the smallest input it accepts are declared, so ``build_model`` checks them
    in one place."""
    build: Callable[..., nn.Module]
    min_image_size: int = 8
    patch_size: bool = False    # takes a ViT patch size
    stem_stride: bool = False   # takes a stride for the CIFAR-style stem (inputs of _SMALL_INPUT px or less)


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, entry: ModelEntry) -> None:
    """Add a named architecture to ``--model`` (the one registry of model names)."""
    if name in MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    MODELS[name] = entry


def _small_cnn(num_classes, in_chans, image_size, small, patch_size, stem_stride):
    return SmallCNN(num_classes, in_chans)


def _resnet18(num_classes, in_chans, image_size, small, patch_size, stem_stride):
    import torchvision

    m = torchvision.models.resnet18(num_classes=num_classes)
    if small:
        m.conv1 = _first_conv(m.conv1, in_chans, kernel_size=3, stride=stem_stride or 1, padding=1)
        m.maxpool = nn.Identity()
    elif in_chans != 3:
        m.conv1 = _first_conv(m.conv1, in_chans)
    return m


def _vgg(name):
    def build(num_classes, in_chans, image_size, small, patch_size, stem_stride):
        import torchvision

        m = getattr(torchvision.models, name)(num_classes=num_classes)
        if in_chans != 3:
            m.features[0] = _first_conv(m.features[0], in_chans)
        if small:
            m.avgpool = nn.AdaptiveAvgPool2d(1)
            m.classifier = nn.Linear(512, num_classes)
        return m
    return build


def _vit(timm_name):
    def build(num_classes, in_chans, image_size, small, patch_size, stem_stride):
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 img_size=image_size, patch_size=patch_size or (4 if small else 16))
    return build


register_model("small_cnn", ModelEntry(_small_cnn))
register_model("vgg16", ModelEntry(_vgg("vgg16"), min_image_size=32))  # five max-pools
register_model("vgg16_bn", ModelEntry(_vgg("vgg16_bn"), min_image_size=32))
register_model("resnet18", ModelEntry(_resnet18, stem_stride=True))
register_model("vit_tiny", ModelEntry(_vit("vit_tiny_patch16_224"), patch_size=True))
register_model("vit_small", ModelEntry(_vit("vit_small_patch16_224"), patch_size=True))
MODEL_NAMES = tuple(MODELS)


def min_image_size(name: str) -> int:
    """The smallest input side the named model accepts (VGG-16's five max-pools need 32; 8 for other names)."""
    return MODELS[name].min_image_size if name in MODELS else 8


def build_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32, *,
                patch_size: int | None = None, stem_stride: int | None = None) -> nn.Module:
    """Build a randomly initialised classifier ``name`` for ``num_classes`` classes of in_chans x image_size^2.

    ``patch_size``: a ViT's patch size (it must divide ``image_size``); ``stem_stride``: the stride of ResNet-18's
    3x3 first conv on small inputs. Either option given for a model that has no such thing is an error."""
    import torchvision

    small = image_size <= _SMALL_INPUT
    entry = MODELS.get(name)
    if stem_stride is not None and not (entry is not None and entry.stem_stride and small):
        raise ValueError(f"stem_stride applies to resnet18 on inputs of {_SMALL_INPUT} px or less, not to {name!r} at "
                         f"{image_size} px")
    if stem_stride is not None and stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    if patch_size is not None and entry is not None and not entry.patch_size:
        raise ValueError(f"patch_size applies to vision transformers, not to {name!r}")
    if patch_size is not None and (patch_size < 1 or image_size % patch_size):
        raise ValueError(f"patch_size {patch_size} must divide the image size {image_size}")
    if entry is not None:
        if image_size < entry.min_image_size:
            raise ValueError(f"{name} needs inputs of at least {entry.min_image_size} px, got image_size={image_size}")
        return entry.build(num_classes, in_chans, image_size, small, patch_size, stem_stride)
    # Any other name: torchvision first, then timm.
    try:
        m = torchvision.models.get_model(name, num_classes=num_classes)
    except ValueError:
        m = None
    if m is not None:
        if patch_size is not None:
            raise ValueError(f"patch_size applies to timm vision transformers, not to torchvision's {name!r}")
        if in_chans != 3:
            raise ValueError(f"torchvision model {name!r} is built for 3 input channels; got in_chans={in_chans}")
        return m
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}, a torchvision "
                         f"classification model name or a timm model name")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # CNNs in timm take no img_size
        if patch_size is not None:
            raise ValueError(f"timm model {name!r} takes no patch_size") from None
        return timm.create_model(name, **kwargs)
