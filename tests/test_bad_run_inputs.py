"""Bad inputs in a run folder give a clear error and lose nothing (issue 25 item 5): ``untrain --force`` replaces a
damaged filters file; an interrupted untraining is not restarted silently; ``evaluate`` refuses to drop the WF-Net
row when filters.safetensors was deleted by hand; a training set whose last batch holds one image trains (BatchNorm
needs more than one value per channel)."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from wfnet.cli import main
from wfnet.train import drop_single_last, make_loader

COMMON = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--out", str(run), "--image-size", "8", "--epochs", "1", "--train-limit", "200",
                 "--test-limit", "100", *COMMON]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", *COMMON]) == 0
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_untrain_force_replaces_a_damaged_filters_file(untrained_run, tmp_path, capsys):
    run = _copy(untrained_run, tmp_path)
    path = run / "filters.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert main(["untrain", str(run), "--max-epochs", "1", *COMMON]) == 2  # without --force: named, nothing done
    err = capsys.readouterr().err
    assert err.startswith(f"wfnet: error: {path}: the filters file is damaged") and "Traceback" not in err
    assert main(["untrain", str(run), "--max-epochs", "1", "--force", *COMMON]) == 0
    out = capsys.readouterr().out
    assert "is damaged or truncated; --force: untraining anew to replace it" in out
    import wfnet

    assert "untrain" in wfnet.read_filters_metadata(path)  # a whole new file
    assert main(["export", str(run), "--forget", "1", "--out", str(tmp_path / "m.safetensors"), *COMMON]) == 0


def test_untrain_without_resume_names_the_interrupted_state(untrained_run, tmp_path, capsys):
    from wfnet.checkpoint import save_state

    run = _copy(untrained_run, tmp_path)
    (run / "filters.safetensors").unlink()  # as after a kill before the first gates landed
    for name in ("results.json", "results.md", "untrain_summary.json"):
        (run / name).unlink(missing_ok=True)
    state = run / "untrain_state.safetensors"
    save_state(state, {"x": torch.zeros(1)}, {"config": {}})
    capsys.readouterr()
    assert main(["untrain", str(run), "--max-epochs", "1", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"wfnet: error: {run} holds an interrupted untraining (untrain_state.safetensors): pass --resume "
                   f"to continue it (with the same options), or --force to discard it and start over")
    assert state.exists()  # nothing lost
    assert main(["untrain", str(run), "--max-epochs", "1", "--force", *COMMON]) == 0
    assert not state.exists() and (run / "filters.safetensors").exists()


def test_evaluate_refuses_to_drop_wfnet_when_its_filters_were_deleted(untrained_run, tmp_path, capsys):
    run = _copy(untrained_run, tmp_path)
    (run / "filters.safetensors").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--metrics", "acc", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wfnet: error: {run / 'filters.safetensors'} does not exist although results.json, "
                          f"results.md, untrain_summary.json describe(s) its gates: recreate it with `wfnet untrain "
                          f"{run}`")
    assert "\n" not in err
    assert not (run / "eval" / "table1.md").exists()
    # leaving WF-Net out is a choice the user can make explicitly
    assert main(["evaluate", str(run), "--metrics", "acc", "--methods", "original", *COMMON]) == 0
    assert "WF-Net" not in (run / "eval" / "table1.md").read_text()


def test_drop_single_last_only_drops_a_batch_of_one():
    assert drop_single_last(81, 16) and drop_single_last(17, 16)
    assert not drop_single_last(80, 16) and not drop_single_last(82, 16) and not drop_single_last(1, 16)
    ds = torch.utils.data.TensorDataset(torch.zeros(81, 1), torch.zeros(81))
    assert [len(b[0]) for b in make_loader(ds, 16, shuffle=True)] == [16] * 5
    assert [len(b[0]) for b in make_loader(ds, 16)][-1] == 1  # evaluation keeps every sample


def test_imagefolder_with_a_last_training_batch_of_one(tmp_path, capsys):
    """3 classes x 30 images: the 10% validation split leaves 81 training images, 5 x 16 + 1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 30), ("val", 4)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    run = tmp_path / "run"
    # resnet18 at 8 px: layer4's BatchNorm sees 1 x 1 maps, so a batch of one image is one value per channel
    code = main(["train", "--out", str(run), "--dataset", "imagefolder", "--data-root", str(root), "--model",
                 "resnet18", "--image-size", "8", "--epochs", "1", "--batch-size", "16", *COMMON])
    out = capsys.readouterr().out
    assert code == 0 and "(81 train / 9 val" in out
    assert main(["baselines", str(run), "--methods", "random-labels,negative-gradients", "--classes", "0",
                 "--epochs", "1", "--batch-size", "16", *COMMON]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", "--batch-size", "16", *COMMON]) == 0


def test_audit_is_cached_like_the_tables(untrained_run, tmp_path, monkeypatch):
    """issue 25 item 6: a second identical audit request reads eval/audit.json (a `wfnet demo` rerun spent 72 s
    recomputing it); other options or --force recompute it."""
    from wfnet import audit

    run = _copy(untrained_run, tmp_path)
    args = ["evaluate", str(run), "--metrics", "mia,probe", "--classes", "0,3", "--audit-samples", "40", *COMMON]
    assert main(args) == 0
    first = (run / "eval" / "audit.json").read_text()
    calls = []
    real = audit.run_audit
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(args) == 0 and calls == [] and (run / "eval" / "audit.json").read_text() == first
    assert main([*args, "--force"]) == 0 and calls == [1]
    assert main([*args[:-len(COMMON)], "--audit-samples", "30", *COMMON]) == 0 and calls == [1, 1]
