"""The `wfnet` command on tiny data: help, train -> untrain -> baselines, config files, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from wfnet.cli import main
from wfnet import Run

TINY = ["--image-size", "8", "--epochs", "2", "--no-progress"]


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("cmd", [[], ["train"], ["untrain"], ["baselines"], ["evaluate"], ["explain"], ["demo"]])
def test_help(cmd, capsys):
    assert main(cmd + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: wfnet" in out and "``" not in out
    # every option has a help line that shows its default; no internal names leak into the metavars
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert "U_" not in out
    for opt in options:
        if opt not in ("--help", "--version"):
            block = out[out.index("  " + opt):].split("\n  --")[0]
            assert "default" in block or "required" in block, opt


def test_untrain_help_lists_each_option_once_with_recipe_defaults(capsys):
    assert main(["untrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("  --lr LR") == 1 and out.count("  --batch-size BATCH_SIZE") == 1
    assert "(default: tuned 0.1, paper 100.0)" in " ".join(out.split())


def test_help_imports_nothing_heavy():
    """`wfnet --help` (the command list) imports no stage module and no torch; `wfnet COMMAND --help` builds only
    that command's options, importing its stage module (the options are its configuration dataclass's fields) and
    no other stage. Times are printed, not asserted (a loaded CI machine once took over 0.5 s)."""
    code = ("import sys, time; import wfnet; before = set(sys.modules); t = time.perf_counter(); "
            "from wfnet.cli import build_parser; p = build_parser(); p.format_help(); "
            "print(time.perf_counter() - t); print(sorted(set(sys.modules) - before)); t = time.perf_counter(); "
            "p = build_parser('baselines'); p._subparsers._group_actions[0].choices['baselines'].format_help(); "
            "print(time.perf_counter() - t); print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seconds, new, seconds_cmd, new_cmd = out.stdout.splitlines()
    heavy = [m for m in eval(new) if m.split(".")[0] in ("torch", "torchvision", "timm", "sklearn", "matplotlib",
                                                         "yaml", "safetensors", "tqdm", "numpy")
             or (m.startswith("wfnet.") and m not in ("wfnet.cli", "wfnet.errors", "wfnet.files"))]
    assert heavy == []
    stages = {m for m in eval(new_cmd) if m in ("wfnet.baselines", "wfnet.untrain", "wfnet.evaluate",
                                                  "wfnet.explain", "wfnet.reproduce", "wfnet.audit")}
    assert stages == {"wfnet.baselines"}
    print(f"`wfnet --help` parser in {float(seconds):.3f} s; `wfnet baselines --help` in {float(seconds_cmd):.3f} s")


def test_every_command_configures(capsys):
    """Every command's options build (each from its stage's configuration dataclass) with no clash."""
    from wfnet.cli import COMMANDS, build_parser

    parser = build_parser(*COMMANDS)
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert "--no-progress" in sub.format_help(), name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert run_cli("train", "--out", out, *TINY) == 0
    return out


def test_train_writes_a_run(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"] == "small_cnn" and cfg["dataset"] == "digits" and cfg["num_classes"] == 10
    assert cfg["image_size"] == 8 and cfg["train"]["epochs"] == 2
    run = Run.open(trained_run)
    assert 0 <= run.original_info()["test_acc"] <= 100
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
    opts = Run.open(trained_run).untrain_options()
    # the file's values are used, the flag overrides the file
    assert opts["lr"] == 0.2 and opts["chi"] == 3 and opts["max_epochs"] == 1 and opts["val_per_epoch"] == 2
    res = json.loads((trained_run / "results.json").read_text())
    assert res["untrain"] == opts
    assert set(res["wf_net"]["per_class"]) == {str(c) for c in range(10)}
    assert (trained_run / "results.md").exists() and (trained_run / "filters.safetensors").exists()
    wf = Run.open(trained_run).wrapped()
    assert any(not torch.equal(p, torch.full_like(p, 3.0)) for p in wf.filter_parameters())
    # other options on the same run need --force
    assert run_cli("untrain", trained_run, "--lr", "0.3", "--max-epochs", "1", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--force" in err and "lr: 0.2 -> 0.3" in err and "chi: 3 -> 3" not in err and "chi: 3 -> None" not in err

    assert run_cli("baselines", trained_run, "--methods", "random-labels,negative-gradients", "--classes", "0,3",
                   "--no-progress") == 0
    run = Run.open(trained_run)
    assert run.baseline_methods() == ["negative-gradients", "random-labels"]  # by name; tables order them
    assert run.baseline_classes("random-labels") == [0, 3]
    summary = json.loads((trained_run / "baselines" / "random-labels" / "summary.json").read_text())
    assert set(summary["seconds"]) == {"0", "3"} and summary["total_seconds"] > 0
    assert run.baseline_model("negative-gradients", 3)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_untrain_targets_from_the_command_line(trained_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    assert run_cli("untrain", run_dir, "--targets", "features.4,features.8", "--max-epochs", "1", "--force",
                   "--no-progress") == 0
    run = Run.open(run_dir)
    assert run.untrain_options()["targets"] == ["features.4", "features.8"]
    assert run.wrapped().layer_names == ["features.4", "features.8"]


def test_retrain_baseline_excludes_the_class(tmp_path):
    out = tmp_path / "r"
    assert run_cli("train", "--out", out, *TINY) == 0
    assert run_cli("baselines", out, "--methods", "retrain", "--classes", "1", "--no-progress") == 0
    m = Run.open(out).baseline_model("retrain", 1)
    x = Run.open(out).data.test.tensors[0]
    assert (m(x).argmax(1) == 1).float().mean() < 0.05  # never trained on class 1


def test_errors_are_clear(tmp_path, capsys, trained_run):
    assert run_cli("train", "--out", tmp_path / "a", "--model", "no_such_net", *TINY) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err
    assert run_cli("train", "--out", tmp_path / "b", "--dataset", "nosuchdata", *TINY) == 2
    assert "invalid choice: 'nosuchdata'" in capsys.readouterr().err
    assert run_cli("train", "--out", tmp_path / "c", "--dataset", "mnist", "--data-root", tmp_path / "missing",
                   *TINY) == 2
    assert "does not exist" in capsys.readouterr().err
    # a folder that holds a different run
    assert run_cli("train", "--out", trained_run, "--model", "resnet18", "--lr", "0.1", *TINY) == 2
    err = capsys.readouterr().err
    assert "already holds a different run" in err and "model: 'small_cnn' -> 'resnet18'" in err \
        and "train.lr: 0.05 -> 0.1" in err
    assert run_cli("untrain", tmp_path / "nothing", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("wfnet: error: run folder") and "does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert run_cli("untrain", tmp_path / "empty", "--no-progress") == 2
    assert "not a wfnet run folder" in capsys.readouterr().err
    assert run_cli("baselines", trained_run, "--methods", "magic", "--no-progress") == 2
    assert "unknown value(s) ['magic']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    assert run_cli("untrain", trained_run, "--config", bad) == 2
    assert "unknown option" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wfnet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("wfnet ")


def test_demo_at_reduced_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "demo-quick"  # its own default folder: `wfnet demo` (runs/demo) is another run
    assert run_cli("demo", "--quick", "--image-size", "8", "--no-progress") == 0
    assert not (tmp_path / "runs" / "demo").exists()
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


def test_inspect_lists_what_wrap_would_filter(capsys):
    from wfnet.cli import main

    assert main(["inspect", "--model", "small_cnn", "--dataset", "digits", "--backends", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "conv" in out and "gate parameters" in out and "left alone" in out
    assert "torch   auto picks it; runs here" in out
    assert main(["inspect", "--model", "no_such_model_xyz"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_export_writes_a_plain_model_that_forgets_the_class(tmp_path, capsys):
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    import wfnet
    from wfnet.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--epochs", "1", "--train-limit", "200", "--test-limit", "100",
                 *common]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", *common]) == 0
    assert "filtering 3 layers of SmallCNN" in capsys.readouterr().out  # the untrain one-line plan
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--forget", "2", "--hard", "0.99", "--out", str(out), *common]) == 0
    with safe_open(str(out), "pt") as f:
        report = json.loads(f.metadata()["wfnet_export"])
    assert report["forget"] == 2 and report["hard"] == 0.99
    r = wfnet.Run.open(run, device="cpu")
    plain = r.original_model()
    plain.load_state_dict(load_file(str(out)))  # a plain model of the run's architecture
    ref = wfnet.export(r.wrapped(), forget=2, hard=0.99)
    x = torch.stack([r.data.test[i][0] for i in range(8)])
    torch.testing.assert_close(plain(x), ref(x))
    assert main(["export", str(run), "--forget", "2", "--out", str(tmp_path / "m.pt"), *common]) == 2
    assert main(["export", str(run), "--forget", "2", "--hard", "2", "--out", str(out), *common]) == 2
