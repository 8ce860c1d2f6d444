"""Datasets by name (digits, MNIST, CIFAR-10 and ImageFolder/ImageNet on small generated folders) and models by
name, with the layer counts the paper reports."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import wfnet
from wfnet.data import labels_of, load_dataset
from wfnet.layers import WFLinear
from wfnet.models import build_model


def test_digits_is_embedded_split_and_repeatable():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert (len(a.train), len(a.val), len(a.test)) == (1212, 135, 450)
    assert a.num_classes == 10 and a.in_chans == 1 and a.image_size == 28
    x, y = a.train[0]
    assert x.shape == (1, 28, 28) and isinstance(int(y), int)
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert not set(a.train.indices) & set(a.val.indices)
    assert sorted(labels_of(a.test).unique().tolist()) == list(range(10))
    assert load_dataset("digits", image_size=32).train[0][0].shape == (1, 32, 32)


def test_limits_and_exclude_class():
    b = load_dataset("digits", train_limit=300, test_limit=100, exclude_class=4)
    assert len(b.test) == 100 and len(b.train) + len(b.val) < 300
    assert 4 not in labels_of(b.train).tolist() and 4 not in labels_of(b.val).tolist()
    with pytest.raises(ValueError, match="out of range"):
        load_dataset("digits", exclude_class=10)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_dataset("imagefolder", root=tmp_path)


def test_real_mnist(mnist_dir):
    b = load_dataset("mnist", root=mnist_dir)
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    counts = torch.bincount(labels_of(b.test), minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # shared/data/README.md
    x = torch.stack([b.train[i][0] for i in range(2000)])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalised with MNIST's mean / std


def _fake_cifar(root, n_per_batch=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(n_per_batch)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                     "truck"]}, f)


def test_cifar10_on_a_generated_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar(tmp_path)
    # torchvision verifies the md5 sums of the real CIFAR-10 files; the generated ones have the layout, not the md5s
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    b = load_dataset("cifar10", root=tmp_path, augment=True)
    assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 20)
    assert b.class_names[0] == "airplane" and b.in_chans == 3
    x, y = b.test[3]
    assert x.shape == (3, 32, 32) and y == 3
    assert b.train[0][0].shape == (3, 32, 32)


def _fake_folders(root, classes=("ant", "bee", "cat"), n_train=4, n_val=7, size=40):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")


def test_imagenet_layout_keeps_five_validation_images_per_class(tmp_path):
    _fake_folders(tmp_path)
    b = load_dataset("imagenet", root=tmp_path, image_size=32)
    assert b.class_names == ["ant", "bee", "cat"]
    assert torch.bincount(labels_of(b.test)).tolist() == [5, 5, 5]
    assert b.test.indices == load_dataset("imagenet", root=tmp_path, image_size=32).test.indices  # fixed seed
    assert b.test[0][0].shape == (3, 32, 32)
    full = load_dataset("imagefolder", root=tmp_path, image_size=32)
    assert torch.bincount(labels_of(full.test)).tolist() == [7, 7, 7]


@pytest.mark.parametrize("name,in_chans,size,layers,kind", [
    ("small_cnn", 1, 28, 3, "conv"),
    ("vgg16", 1, 32, 13, "conv"),
    ("resnet18", 3, 32, 20, "conv"),  # 17 convs + 3 downsample convs, as in the paper
    ("vit_tiny", 3, 32, 12, "qkv"),
    ("vit_small", 1, 28, 12, "qkv"),
    ("mobilenet_v3_small", 3, 32, 52, "conv"),  # any torchvision name: depthwise and squeeze-excitation convs too
    ("resnet10t", 1, 32, 14, "conv"),  # any timm name (3-conv deep stem + 8 block convs + 3 downsample)
])
def test_models_by_name_wrap_as_the_paper_says(name, in_chans, size, layers, kind):
    torch.manual_seed(0)
    m = build_model(name, 10, in_chans, size).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        ref = m(x)
    assert ref.shape == (2, 10)
    wf = wfnet.wrap(m, 10)
    assert len(wf.layer_names) == layers
    assert all(isinstance(l, WFLinear) for l in wf.filtered_layers().values()) == (kind == "qkv")
    with torch.no_grad():
        assert torch.equal(wf(x), ref)
        assert wf(x, forget=torch.tensor([1, 2])).shape == (2, 10)


def test_unknown_model_and_too_small_vgg():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet_9000", 10)
    with pytest.raises(ValueError, match="at least 32"):
        build_model("vgg16", 10, 1, 28)
