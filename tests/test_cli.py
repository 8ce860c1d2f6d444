"""The `wfnet` command on tiny data: help, train -> untrain -> baselines, config files, clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from wfnet.cli import main
from wfnet.experiment import Run

TINY = ["--image-size", "8", "--epochs", "2", "--no-progress"]


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("cmd", [[], ["train"], ["untrain"], ["baselines"], ["evaluate"], ["explain"], ["demo"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    assert "usage: wfnet" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert run_cli("train", "--out", out, *TINY) == 0
    return out


def test_train_writes_a_run(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"] == "small_cnn" and cfg["dataset"] == "digits" and cfg["num_classes"] == 10
    assert cfg["image_size"] == 8 and cfg["train"]["epochs"] == 2
    assert 0 <= cfg["original_test_acc"] <= 100
    run = Run(trained_run)
    m = run.original_model()
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # a second train into the same folder with the same options does nothing
    assert run_cli("train", "--out", trained_run, *TINY) == 0


def test_untrain_and_baselines(trained_run, tmp_path, capsys):
    cfg_file = tmp_path / "untrain.yaml"
    cfg_file.write_text("max-epochs: 1\nval_per_epoch: 2\nlr: 0.2\nchi: 2\n")
    assert run_cli("untrain", trained_run, "--config", cfg_file, "--chi", "3", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "| WF-Net (tuned recipe" in out
    cfg = json.loads((trained_run / "config.json").read_text())
    # the file's values are used, the flag overrides the file
    assert cfg["untrain"]["lr"] == 0.2 and cfg["untrain"]["chi"] == 3 and cfg["untrain"]["max_epochs"] == 1
    res = json.loads((trained_run / "results.json").read_text())
    assert set(res["wf_net"]["per_class"]) == {str(c) for c in range(10)}
    assert (trained_run / "results.md").exists() and (trained_run / "filters.safetensors").exists()
    wf = Run(trained_run).wf_model()
    assert any(not torch.equal(p, torch.full_like(p, 3.0)) for p in wf.filter_parameters())
    # other options on the same run need --force
    assert run_cli("untrain", trained_run, "--lr", "0.3", "--max-epochs", "1", "--no-progress") == 2
    assert "--force" in capsys.readouterr().err

    assert run_cli("baselines", trained_run, "--methods", "random-labels,negative-gradients", "--classes", "0,3",
                   "--no-progress") == 0
    run = Run(trained_run)
    assert run.baseline_methods() == ["random-labels", "negative-gradients"]
    assert run.baseline_classes("random-labels") == [0, 3]
    summary = json.loads((trained_run / "baselines" / "random-labels" / "summary.json").read_text())
    assert set(summary["seconds"]) == {"0", "3"} and summary["total_seconds"] > 0
    assert run.baseline_model("negative-gradients", 3)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_retrain_baseline_excludes_the_class(tmp_path):
    out = tmp_path / "r"
    assert run_cli("train", "--out", out, *TINY) == 0
    assert run_cli("baselines", out, "--methods", "retrain", "--classes", "1", "--no-progress") == 0
    m = Run(out).baseline_model("retrain", 1)
    x = Run(out).data.test.tensors[0]
    assert (m(x).argmax(1) == 1).float().mean() < 0.05  # never trained on class 1


def test_errors_are_clear(tmp_path, capsys, trained_run):
    assert run_cli("train", "--out", tmp_path / "a", "--model", "no_such_net", *TINY) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err
    assert run_cli("train", "--out", tmp_path / "b", "--dataset", "nosuchdata", *TINY) == 2
    assert "unknown dataset 'nosuchdata'" in capsys.readouterr().err
    assert run_cli("train", "--out", tmp_path / "c", "--dataset", "mnist", "--data-root", tmp_path / "missing",
                   *TINY) == 2
    assert "does not exist" in capsys.readouterr().err
    # a folder that holds a different run
    assert run_cli("train", "--out", trained_run, "--model", "resnet18", *TINY) == 2
    assert "already holds a different run" in capsys.readouterr().err
    assert run_cli("untrain", tmp_path / "nothing", "--no-progress") == 2
    assert "not a wfnet run folder" in capsys.readouterr().err
    assert run_cli("baselines", trained_run, "--methods", "magic", "--no-progress") == 2
    assert "unknown baseline" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    assert run_cli("untrain", trained_run, "--config", bad) == 2
    assert "unknown option" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wfnet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("wfnet ")


def test_demo_at_reduced_size(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--quick", "--image-size", "8", "--out", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "# Table 1: digits / small_cnn" in printed and "demo finished" in printed
    for f in ("config.json", "original.safetensors", "filters.safetensors", "results.json", "results.md",
              "eval/table1.md", "eval/table2.json", "explain/report.md", "explain/gates_heatmap.png",
              "explain/insertion_deletion.png"):
        assert (out / f).exists(), f
    t1 = json.loads((out / "eval" / "table1.json").read_text())
    assert "wfnet" in json.dumps(t1)
    res = json.loads((out / "results.json").read_text())
    assert res["wf_net"]["acc_f"] < res["original"]["acc_f"]  # forgetting happened
