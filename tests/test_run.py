"""wfnet.Run and its folder transactions, in process: a multi-file commit killed at every step, a failed untraining
that must leave the folder as it was (issue 12's bug), baselines replaced only once complete, the Python API."""
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import wfnet
from wfnet import Run, RunError, files
from wfnet.checkpoint import read_state_meta
from wfnet.cli import main
from wfnet import baselines, evaluate, explain, train, untrain
from wfnet.baselines import BaselineConfig
from wfnet.config import DataConfig
from wfnet.evaluate import EvalConfig
from wfnet.train import TrainConfig
from run_invariants import check_run_folder

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DataConfig(image_size=8, train_limit=300, test_limit=100)
TRAIN = TrainConfig(epochs=1, batch_size=64)


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny run, untrained (options A), evaluated (accuracy) and explained: a folder full of derived results."""
    out = tmp_path_factory.mktemp("run") / "r"
    run = train.run(Run.create(out, DATA, log=False), TRAIN, progress=False)
    untrain.run(run, untrain.config_for(run, max_epochs=1, val_per_epoch=1), progress=False)
    evaluate.run(run, EvalConfig(metrics=["acc"]), progress=False)
    return out


# ------------------------------------------------------------------------------------------------------------------
# files.commit


def _layout(root: Path, version: str):
    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(version)
    (root / "d" / "x.txt").write_text(version)
    (root / "stale.txt").write_text(version)


def _state(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_commit_killed_at_every_step_is_all_old_or_all_new(tmp_path, monkeypatch):
    old = {"a.txt": "old", "d/x.txt": "old", "stale.txt": "old"}
    new = {"a.txt": "new", "d/x.txt": "new"}
    real_replace = os.replace
    outcomes = set()
    for k in range(12):
        root = tmp_path / f"k{k}"
        _layout(root, "old")
        files.write_text(files.staging_path(root, "a.txt"), "new")
        staged_dir = root / ".pending-d"
        staged_dir.mkdir()
        (staged_dir / "x.txt").write_text("new")
        calls = {"n": 0}

        def replace_then_die(src, dst):
            if calls["n"] == k:
                raise KeyboardInterrupt("killed")
            calls["n"] += 1
            real_replace(src, dst)

        monkeypatch.setattr(files.os, "replace", replace_then_die)
        try:
            files.commit(root, new={"a.txt": files.staging_path(root, "a.txt").name, "d": ".pending-d"},
                         stale=["d", "stale.txt"])
            killed = False
        except KeyboardInterrupt:
            killed = True
        monkeypatch.setattr(files.os, "replace", real_replace)
        files.recover(root)
        state = {k2: v for k2, v in _state(root).items() if not k2.startswith(".pending-")}
        assert state in (old, new), (k, state)
        assert not (root / files.JOURNAL).exists() and not (root / ".stale").exists()
        outcomes.add((killed, state == new))
    assert outcomes == {(True, False), (True, True), (False, True)}  # killed before / after the journal, and not


def test_commit_refuses_to_overwrite_an_unlisted_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / ".staged-d").mkdir()
    with pytest.raises(ValueError, match="list it in stale"):
        files.commit(tmp_path, new=["d"])
    with pytest.raises(FileNotFoundError, match="nothing staged"):
        files.commit(tmp_path, new=["e"])


# ------------------------------------------------------------------------------------------------------------------
# untraining: the bug of issue 12


def test_failed_untraining_with_new_options_leaves_the_folder_as_it_was(untrained, monkeypatch):
    before = _snapshot(untrained)
    held = check_run_folder(untrained)
    run = Run.open(untrained, log=False)
    new = untrain.config_for(run, max_epochs=1, val_per_epoch=1, lr=0.3)

    def dies(*args, **kwargs):
        raise RuntimeError("killed in the middle of untraining")

    monkeypatch.setattr("wfnet.untrain.untrain", dies)
    with pytest.raises(RuntimeError, match="killed"):
        untrain.run(run, new, force=True, progress=False)
    assert _snapshot(untrained) == before
    assert check_run_folder(untrained) == held
    # the folder still says what it holds: the old gates, their results, and a clear refusal naming the difference
    with pytest.raises(RunError, match=r"other options \(lr: 0.1 -> 0.3\); pass --force"):
        untrain.run(Run.open(untrained), new, progress=False)
    assert Run.open(untrained).results()["untrain"]["lr"] == 0.1


def test_unavailable_backend_is_one_line_before_any_work(untrained, capsys):
    before = _snapshot(untrained)
    code = main(["untrain", str(untrained), "--force", "--lr", "0.3", "--device", "cpu", "--backend", "cuda",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("wfnet: error: --backend cuda cannot run on cpu") and err.count("\n") == 1
    assert _snapshot(untrained) == before


def test_untraining_with_new_options_replaces_gates_and_stale_results_together(tmp_path, untrained):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(untrained, out)
    run = Run.open(out, log=False)
    explain.run(run, progress=False)
    old = check_run_folder(out)
    assert (out / "eval" / "table1.md").exists() and (out / "explain" / "report.md").exists()
    res = untrain.run(run, untrain.config_for(run, max_epochs=1, val_per_epoch=1, lr=0.3), force=True, progress=False)
    new = check_run_folder(out)
    assert new["wfnet"] != old["wfnet"] and new["untrain"]["lr"] == 0.3 and res["untrain"]["lr"] == 0.3
    # the tables and figures of the old gates went in the same step; the accuracy caches of the original stay valid
    assert not (out / "eval" / "table1.md").exists() and not (out / "explain").exists()
    assert not (out / "eval" / "acc_wfnet.json").exists() and (out / "eval" / "acc_original.json").exists()
    # results deleted by hand are recomputed from the gates, without untraining again
    (out / "results.json").unlink()
    again = untrain.run(Run.open(out, log=False), untrain.config_for(run, max_epochs=1, val_per_epoch=1, lr=0.3),
                                             progress=False)
    assert again["filters_stamp"] == new["wfnet"] and check_run_folder(out)["wfnet"] == new["wfnet"]


def test_evaluation_cache_entries_follow_their_model(tmp_path, untrained):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(untrained, out)
    cache = json.loads((out / "eval" / "acc_wfnet.json").read_text())
    stamp = Run.open(out).model_stamp("wfnet")
    assert {v["stamp"] for v in cache["per_class"].values()} == {stamp}
    # an entry of another model (say, a cache restored from a backup) is not used: it is recomputed
    cache["per_class"]["3"] = {**cache["per_class"]["3"], "acc_f": 55.5, "stamp": "someone-else"}
    files.write_json(out / "eval" / "acc_wfnet.json", cache)
    t = evaluate.run(Run.open(out, log=False), EvalConfig(metrics=["acc"]), progress=False)
    row = next(r for r in t["table1"]["rows"] if r["method"] == "wfnet")
    assert row["per_class"]["3"]["acc_f"] != 55.5 and t["table1"]["stamps"]["wfnet"]["3"] == stamp


# ------------------------------------------------------------------------------------------------------------------
# baselines


def test_baselines_with_new_options_replace_the_old_ones_only_once_complete(tmp_path, untrained, monkeypatch):
    import shutil

    import wfnet.baselines as B

    out = tmp_path / "copy"
    shutil.copytree(untrained, out)
    run = Run.open(out, log=False)
    a = BaselineConfig(methods=["negative-gradients"], classes=[0, 1], lr=0.01)
    baselines.run(run, a, progress=False)
    assert check_run_folder(out)["baselines"]["negative-gradients"]["lr"] == 0.01
    b = replace(a, lr=0.02)
    with pytest.raises(RunError, match=r"made with other options \(lr: 0.01 -> 0.02\); pass --force"):
        baselines.run(run, b, progress=False)
    real = B.unlearn_baseline

    def dies_on_class_1(method, original, bundle, c, *args, **kwargs):
        if c == 1:
            raise KeyboardInterrupt("killed")
        return real(method, original, bundle, c, *args, **kwargs)

    monkeypatch.setattr(B, "unlearn_baseline", dies_on_class_1)
    with pytest.raises(KeyboardInterrupt):
        baselines.run(run, b, force=True, progress=False)
    held = check_run_folder(out)
    assert held["baselines"]["negative-gradients"]["lr"] == 0.01 and held["pending"]["negative-gradients"]["lr"] == 0.02
    monkeypatch.setattr(B, "unlearn_baseline", real)
    baselines.run(run, b, force=True, progress=False)
    held = check_run_folder(out)
    assert held["baselines"]["negative-gradients"]["lr"] == 0.02 and held["pending"] == {}
    assert Run.open(out).baseline_classes("negative-gradients") == [0, 1]


# ------------------------------------------------------------------------------------------------------------------
# the Python API and its errors


def test_load_a_run_and_get_a_model_that_forgets_class_c(untrained):
    run = wfnet.Run.open(untrained)
    x = torch.stack([run.data.test[i][0] for i in range(16)])
    wf = run.wrapped()
    with torch.no_grad():
        torch.testing.assert_close(wf(x), run.original_model()(x))
        plain = run.forget_model(3)
        assert not any(isinstance(m, (wfnet.WFConv2d, wfnet.WFLinear)) for m in plain.modules())
        torch.testing.assert_close(plain(x), wf(x, forget=3), rtol=1e-4, atol=1e-4)
    assert run.untrain_options()["max_epochs"] == 1
    with pytest.raises(RunError, match="out of range"):
        run.forget_model(10)


def test_open_errors_say_what_is_wrong(tmp_path, untrained):
    with pytest.raises(RunError, match="does not exist"):
        Run.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a wfnet run folder"):
        Run.open(tmp_path / "empty")
    with pytest.raises(RunError, match=r"already holds a different run \(model: 'small_cnn' -> 'resnet18'"):
        train.run(Run.create(untrained, replace(DATA, model="resnet18"), log=False), TRAIN, progress=False)
    fresh = train.run(Run.create(tmp_path / "fresh", DATA, log=False), TRAIN, progress=False)
    with pytest.raises(RunError, match="untrain first"):
        fresh.wrapped()
    # a run with no gates yet evaluates what it has: the original model
    rows = evaluate.run(fresh, EvalConfig(metrics=["acc"]), progress=False)["table1"]["rows"]
    assert [r["method"] for r in rows] == ["original"]
    with pytest.raises(RunError, match="untrain first"):
        evaluate.run(fresh, EvalConfig(metrics=["acc"], methods=["wfnet"]), progress=False)


def test_interrupted_training_is_resumed_or_replaced(tmp_path, monkeypatch):
    import wfnet.train as T

    out = tmp_path / "r"
    real_save = T.save_state

    def killed_after_first_epoch(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt("killed")

    real_shift = T.random_shift

    def slow_first_epoch(*a, **k):  # the killed process's epoch takes >= 2 s
        time.sleep(2.0)
        monkeypatch.setattr(T, "random_shift", real_shift)
        return real_shift(*a, **k)

    monkeypatch.setattr(T, "save_state", killed_after_first_epoch)
    monkeypatch.setattr(T, "random_shift", slow_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(Run.create(out, DATA, log=False), replace(TRAIN, epochs=2), progress=False)
    monkeypatch.setattr(T, "save_state", real_save)
    assert sorted(os.listdir(out)) == ["config.json", "train_state.safetensors"]
    killed = read_state_meta(out / "train_state.safetensors")
    assert killed["seconds"] >= 2.0 and killed["history"][0]["seconds"] >= 2.0
    check_run_folder(out)
    with pytest.raises(RunError, match=r"--resume: the interrupted training .* used other options \(train.lr"):
        train.run(Run.create(out, DATA, log=False), replace(TRAIN, epochs=2, lr=0.1), resume=True, progress=False)
    run = train.run(Run.create(out, DATA, log=False), replace(TRAIN, epochs=2), resume=True, progress=False)
    # the original's training time counts the killed process's (slow) epoch, not only the resumed process's
    assert run.original_info()["seconds"] > killed["seconds"]
    assert check_run_folder(out)["original"] == run.original_info()["stamp"]
    assert not (out / "train_state.safetensors").exists()
