"""Data-parallel untraining: `torchrun --nproc_per_node=2 -m wfnet untrain` (gloo, 2 CPU processes) must give the
gates of a 1-process run, within float tolerance."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from wfnet.cli import main
from wfnet import Run


def test_two_processes_match_one(tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--out", str(base), "--image-size", "8", "--epochs", "1", "--no-progress"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    opts = ["--max-epochs", "1", "--val-per-epoch", "2", "--batch-size", "64", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([sys.executable, "-m", "wfnet", "untrain", str(one), *opts], env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wfnet",
           "untrain", str(two), *opts]
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r2.returncode != 0 and "terminate called without an active exception" in r2.stderr:
        # gloo's teardown at process exit crashes a rank about once in ten runs on this 2-core machine, after the
        # run has finished (seen before and after the run-folder rework); the rerun resumes or reports "already
        # untrained". Any other failure, or this one twice, fails the test.
        r2 = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    g1 = dict(Run.open(one).wrapped().named_filter_parameters())
    g2 = dict(Run.open(two).wrapped().named_filter_parameters())
    assert g1.keys() == g2.keys()
    moved = False
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-4)
        moved |= not torch.equal(g1[k], torch.full_like(g1[k], 3.0))
    assert moved
