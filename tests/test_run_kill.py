"""SIGKILL `wfnet train`, `wfnet untrain --force` (new options) and `wfnet baselines --force` (new options) at random
moments, and check the run folder's invariants (tests/run_invariants.py) after every kill: the folder is as it was,
or holds an interrupted run of the new options, and never shows results next to models they were not made from.
Then `--resume` / a rerun finishes the job.

Tiny data (digits at 8 px, 300 training samples, one thread) keeps each command a few seconds. The kill moments are
random but seeded (WFNET_KILL_SEED, printed on failure)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from run_invariants import check_run_folder
from wfnet import Run
from wfnet import baselines, evaluate, explain, train, untrain
from wfnet.baselines import BaselineConfig
from wfnet.config import DataConfig
from wfnet.evaluate import EvalConfig
from wfnet.train import TrainConfig

SEED = int(os.environ.get("WFNET_KILL_SEED", "0"))
KILLS = 3
SMALL = ["--no-progress", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

pytestmark = pytest.mark.usefixtures("one_thread")


def wfnet(*args, kill_after: float | None = None) -> int | None:
    """Run `python -m wfnet ARGS`; with ``kill_after``, SIGKILL it after that many seconds (None: it was killed)."""
    p = subprocess.Popen([sys.executable, "-m", "wfnet", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        return 0
    try:
        p.communicate(timeout=kill_after)
        return p.returncode
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        return None


def _kill_moments(rng, lo, hi):
    """KILLS moments spread over [lo, hi] (one random point in each slice), so early and late kills both happen."""
    width = (hi - lo) / KILLS
    return [lo + width * (i + rng.random()) for i in range(KILLS)]


def _timed(*args) -> float:
    t = time.perf_counter()
    wfnet(*args)
    return time.perf_counter() - t


@pytest.fixture
def rng():
    return random.Random(SEED)


def test_kill_train(tmp_path, rng):
    args = ["train", "--out", tmp_path / "r", "--image-size", 8, "--train-limit", 300, "--test-limit", 100,
            "--epochs", 4, "--batch-size", 32, *SMALL]
    full = _timed(*args[:2], tmp_path / "timing", *args[3:])
    for i, t in enumerate(_kill_moments(rng, 0.5, full)):
        rc = wfnet(*args, *(["--resume"] if i else []), kill_after=t)
        held = check_run_folder(tmp_path / "r")
        assert rc in (None, 0) and (rc is None or "original" in held), (t, rc, SEED)
    wfnet(*args, "--resume")
    held = check_run_folder(tmp_path / "r")
    assert "original" in held and not (tmp_path / "r" / "train_state.safetensors").exists()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Trained, untrained with options A, baselines with options A, evaluated and explained."""
    out = tmp_path_factory.mktemp("kill") / "base"
    run = train.run(Run.create(out, DataConfig(image_size=8, train_limit=300, test_limit=100), log=False),
                    TrainConfig(epochs=1), progress=False)
    untrain.run(run, untrain.config_for(run, max_epochs=1, val_per_epoch=2), progress=False)
    baselines.run(run, BaselineConfig(methods=["random-labels", "negative-gradients"], classes=[0, 1], lr=0.01),
                  progress=False)
    evaluate.run(run, EvalConfig(metrics=["acc", "zrf"]), progress=False)
    explain.run(run, progress=False)
    return out


def _copy(base, dst):
    import shutil

    shutil.copytree(base, dst)
    return dst


def test_kill_untrain_with_new_options(tmp_path, base_run, rng):
    old = check_run_folder(base_run)
    run_dir = _copy(base_run, tmp_path / "r")
    args = ["untrain", run_dir, "--force", "--lr", 0.3, "--max-epochs", 3, "--val-per-epoch", 3, *SMALL]
    full = _timed("untrain", _copy(base_run, tmp_path / "timing"), *args[2:])
    seen = set()
    for i, t in enumerate(_kill_moments(rng, 0.5, full)):
        rc = wfnet(*args, *(["--resume"] if i else []), kill_after=t)
        held = check_run_folder(run_dir)
        if held["wfnet"] == old["wfnet"]:  # the old gates, with their own results
            assert held["untrain"] == old["untrain"] and rc is None
            seen.add("old")
        else:  # the new gates, with theirs
            assert held["untrain"]["lr"] == 0.3 and held["untrain"]["max_epochs"] == 3
            seen.add("new")
        assert held["baselines"] == old["baselines"]  # untraining never touches the baselines
    wfnet(*args, "--resume")
    held = check_run_folder(run_dir)
    assert held["untrain"]["lr"] == 0.3 and held["original"] == old["original"]
    assert "old" in seen


def test_kill_baselines_with_new_options(tmp_path, base_run, rng):
    old = check_run_folder(base_run)
    run_dir = _copy(base_run, tmp_path / "r")
    args = ["baselines", run_dir, "--methods", "random-labels,negative-gradients", "--classes", "0,1", "--lr", 0.02,
            "--force", *SMALL]
    full = _timed("baselines", _copy(base_run, tmp_path / "timing"), *args[2:])
    for t in _kill_moments(rng, 0.5, full):
        wfnet(*args, kill_after=t)
        held = check_run_folder(run_dir)
        for method, options in held["baselines"].items():
            assert options["lr"] in (0.01, 0.02), method  # one configuration per method, old or new
        assert held["wfnet"] == old["wfnet"]
    wfnet(*args)
    held = check_run_folder(run_dir)
    assert {m: o["lr"] for m, o in held["baselines"].items()} == {"random-labels": 0.02, "negative-gradients": 0.02}
    assert held["pending"] == {}
