"""save_filters / load_filters: safetensors round trip with metadata, atomic writes (no temp files left, a failed
write leaves the existing file untouched), and every rejection (wrong num_classes, other layers, wrong shapes, a
foreign safetensors file, a file that is not safetensors) raising ValueError with the model left unchanged.
"""
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import wfnet
from wfnet import serialization


class Net(nn.Module):
    def __init__(self, widths=(6, 8), num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False)
        self.head = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x).relu()).mean((2, 3)))


def wrapped(num_classes=4, seed=0, gate_seed=None, **kw):
    """Net weights from ``seed``, random gates from ``gate_seed`` (default: the same seed)."""
    torch.manual_seed(seed)
    wf = wfnet.wrap(Net(num_classes=num_classes, **kw), num_classes=num_classes)
    g = torch.Generator().manual_seed(seed if gate_seed is None else gate_seed)
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return wf


def gates(wf):
    return {k: v.detach().clone() for k, v in wf.named_filter_parameters()}


def assert_same_gates(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_with_metadata(tmp_path):
    src = wrapped(seed=0)
    path = tmp_path / "filters.safetensors"
    wfnet.save_filters(src, path, metadata={"dataset": "cifar10", "epochs": 3})
    assert os.listdir(tmp_path) == ["filters.safetensors"]  # no temp file left behind

    raw = safetensors.torch.load_file(path)
    assert set(raw) == {"conv1.alpha_weight", "conv1.alpha_bias", "conv2.alpha_weight"}
    meta = wfnet.read_filters_metadata(path)
    assert meta["format"] == "wfnet-filters" and meta["num_classes"] == "4"
    assert json.loads(meta["layers"]) == ["conv1", "conv2"] and meta["backbone"] == "Net"
    assert meta["wfnet_version"] == wfnet.__version__
    assert meta["dataset"] == "cifar10" and json.loads(meta["epochs"]) == 3

    dst = wrapped(seed=0, gate_seed=1)  # same frozen weights, other gates
    x = torch.randn(3, 3, 6, 6)
    rows = torch.tensor([0, 3, 1])
    assert not torch.allclose(dst(x, forget=rows), src(x, forget=rows))
    loaded_meta = wfnet.load_filters(dst, path)
    assert loaded_meta == meta
    assert_same_gates(gates(dst), gates(src))
    torch.testing.assert_close(dst(x, forget=rows), src(x, forget=rows), rtol=0, atol=0)
    # the file holds only the gates: a model with other frozen weights keeps its own
    other = wrapped(seed=5)
    weight = other.model.conv1.weight.clone()
    wfnet.load_filters(other, path)
    assert torch.equal(other.model.conv1.weight, weight) and not torch.equal(weight, src.model.conv1.weight)
    assert_same_gates(gates(other), gates(src))


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "f.safetensors"
    a, b = wrapped(seed=0), wrapped(seed=1)
    wfnet.save_filters(a, path)
    wfnet.save_filters(b, path)
    assert os.listdir(tmp_path) == ["f.safetensors"]
    c = wrapped(seed=2)
    wfnet.load_filters(c, path)
    assert_same_gates(gates(c), gates(b))
    # the file keeps the permissions a plainly created file would get, not mkstemp's private 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    wfnet.save_filters(wrapped(seed=0), path)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        wfnet.save_filters(wrapped(seed=1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["f.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        wfnet.save_filters(wrapped(seed=1), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["f.safetensors"]


def test_save_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "f.safetensors"
    wfnet.save_filters(wrapped(), str(path))
    assert path.exists()


def _rejected(wf, path, match):
    before = gates(wf)
    with pytest.raises(ValueError, match=match):
        wfnet.load_filters(wf, path)
    assert_same_gates(gates(wf), before)


def test_load_rejects_wrong_num_classes(tmp_path):
    path = tmp_path / "f.safetensors"
    wfnet.save_filters(wrapped(num_classes=4), path)
    _rejected(wrapped(num_classes=5), path, r"num_classes=4.*num_classes=5")


def test_load_rejects_other_layers(tmp_path):
    path = tmp_path / "f.safetensors"
    wfnet.save_filters(wrapped(), path)
    torch.manual_seed(0)
    only_conv1 = wfnet.wrap(Net(), num_classes=4, targets=["conv1"])
    _rejected(only_conv1, path, r"missing from file \[\].*not in model \['conv2'\]")
    with_head = wfnet.wrap(Net(), num_classes=4, targets=["conv1", "conv2", "head"])
    _rejected(with_head, path, r"missing from file \['head'\]")


def test_load_rejects_wrong_shapes(tmp_path):
    path = tmp_path / "f.safetensors"
    wfnet.save_filters(wrapped(widths=(6, 8)), path)
    _rejected(wrapped(widths=(6, 9)), path, r"conv2\.alpha_weight has shape \[4, 8\].*\[4, 9\]")


def test_load_rejects_tampered_tensor_set(tmp_path):
    src = wrapped()
    tensors = {k: v.contiguous() for k, v in gates(src).items()}
    del tensors["conv1.alpha_bias"]
    meta = {"format": "wfnet-filters", "num_classes": "4", "layers": json.dumps(["conv1", "conv2"])}
    path = tmp_path / "f.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=meta)
    _rejected(wrapped(seed=3), path, r"conv1\.alpha_bias")


def test_load_rejects_foreign_and_broken_files(tmp_path):
    wf = wrapped()
    foreign = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"conv1.weight": torch.zeros(6, 3, 3, 3)}, foreign)
    _rejected(wf, foreign, "not a wfnet filters file")
    other_meta = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, other_meta, metadata={"format": "pt"})
    _rejected(wf, other_meta, r"not a wfnet filters file.*'pt'")
    incomplete = tmp_path / "incomplete.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, incomplete, metadata={"format": "wfnet-filters"})
    _rejected(wf, incomplete, "num_classes")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    _rejected(wf, garbage, "damaged or truncated")
    with pytest.raises(FileNotFoundError):
        wfnet.load_filters(wf, tmp_path / "missing.safetensors")


def test_type_checks_and_reserved_metadata(tmp_path):
    wf = wrapped()
    with pytest.raises(TypeError, match="WFModel"):
        wfnet.save_filters(wf.model, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        wfnet.save_filters(wf, tmp_path / "f.safetensors", metadata={"num_classes": 99})
    assert os.listdir(tmp_path) == []


def test_load_into_model_on_other_dtype_keeps_model_dtype(tmp_path):
    path = tmp_path / "f.safetensors"
    src = wrapped()
    wfnet.save_filters(src, path)
    dst = wrapped(seed=1).double()
    wfnet.load_filters(dst, path)
    for k, v in gates(dst).items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(v, gates(src)[k].double())
