"""Damaged safetensors files (issue 25 item 5): a truncated filters file or model weights file raises one clear
exception, ``wfnet.CorruptFileError`` (a ValueError), naming the file and what to do -- never safetensors' own
SafetensorError -- from every library reader: load_filters, read_filters_metadata, load_state, read_state_meta,
load_model_weights."""
import pickle

import pytest
import torch
import torch.nn as nn

import wfnet
from wfnet import checkpoint
from wfnet.files import CorruptFileError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


# keep: the header cut (4 bytes, 40 bytes), the tensor data cut short (all but 1 byte), an empty file
CUTS = {"header_length": lambda n: 4, "header": lambda n: 40, "data": lambda n: n - 1, "empty": lambda n: 0}


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_filters_file(tmp_path, cut):
    torch.manual_seed(0)
    wf = wfnet.wrap(Net(), num_classes=3)
    path = tmp_path / "filters.safetensors"
    wfnet.save_filters(wf, path)
    _truncate(path, CUTS[cut])
    before = {k: p.detach().clone() for k, p in wf.named_filter_parameters()}
    for read in (lambda: wfnet.load_filters(wf, path), lambda: wfnet.read_filters_metadata(path)):
        with pytest.raises(wfnet.CorruptFileError) as info:
            read()
        err = info.value
        assert isinstance(err, ValueError) and err.__cause__ is None and err.__suppress_context__
        assert err.path == str(path) and err.what == "filters file"
        message = str(err)
        assert message.startswith(f"{path}: the filters file is damaged or truncated")
        assert "delete it and recreate it" in message and "wfnet untrain <run>" in message and "\n" not in message
    assert all(torch.equal(p, before[k]) for k, p in wf.named_filter_parameters())  # nothing loaded


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_model_weights_file(tmp_path, cut):
    path = tmp_path / "original.safetensors"
    checkpoint.save_model(Net(), path, meta={"epochs": 1})
    _truncate(path, CUTS[cut])
    for read, what in ((lambda: checkpoint.load_model_weights(Net(), path), "model weights file"),
                       (lambda: checkpoint.load_state(path), "checkpoint"),
                       (lambda: checkpoint.read_state_meta(path), "checkpoint")):
        with pytest.raises(CorruptFileError, match=rf"^{path}: the {what} is damaged or truncated and cannot be "
                                                   r"read \(.*\); delete it and recreate it"):
            read()


def test_intact_files_still_load_and_missing_files_stay_file_not_found(tmp_path):
    path = tmp_path / "original.safetensors"
    model = Net()
    checkpoint.save_model(model, path, meta={"epochs": 1})
    other = Net()
    assert checkpoint.load_model_weights(other, path) == {"epochs": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        checkpoint.load_state(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        wfnet.read_filters_metadata(tmp_path / "missing.safetensors")


def test_corrupt_file_error_pickles_and_is_exported():
    err = CorruptFileError("/r/filters.safetensors", "filters file", "header too small", "do this")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.path == err.path and copy.hint == "do this"
    assert wfnet.CorruptFileError is CorruptFileError and "CorruptFileError" in wfnet.__all__


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    from wfnet.cli import main

    run = tmp_path_factory.mktemp("runs") / "digits"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--image-size", "8", "--epochs", "1", "--train-limit", "200",
                 "--test-limit", "100", *common]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", *common]) == 0
    return run


@pytest.mark.parametrize("name", ["filters.safetensors", "original.safetensors"])
def test_cli_names_a_damaged_run_file_in_one_line(untrained_run, tmp_path, name, capsys):
    import shutil

    from wfnet.cli import main

    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    _truncate(run / name, lambda n: n // 2)
    capsys.readouterr()
    code = main(["export", str(run), "--forget", "2", "--out", str(tmp_path / "m.safetensors"), "--no-progress",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"wfnet: error: {run / name}: the ") and "is damaged or truncated" in err
    assert "\n" not in err and "Traceback" not in err
