"""`wfnet reproduce` end to end on a tiny profile: every stage per backbone, the paper recipe's sibling run, the
combined tables beside the paper's rows, the figure, and a rerun that skips finished stages."""
import json

import pytest

import wfnet.reproduce as R
from wfnet.cli import main

TINY = {"model": "small_cnn", "data": {"train_limit": 300, "test_limit": 150},
        "train": {"epochs": 1, "batch_size": 64, "schedule": "onecycle", "shift": 1},
        "untrain": {"max_epochs": 1, "max_steps": 2, "val_per_epoch": 1},
        "baselines": {"random-labels": [0, 1]}, "baseline_options": {"max_steps": 2},
        "eval": {"rt_max_epochs": 2, "test_limit": 100}}


def reproduce(out, dataset, models, profile, *, paper_recipe_for=(), device="cpu", progress=False, force=False,
              log=print):
    """The reproduce stage with its ReproduceConfig built from these arguments."""
    cfg = R.ReproduceConfig(out=str(out), dataset=dataset, models=list(models), profile=profile,
                            paper_recipe_for=list(paper_recipe_for))
    return R.run(cfg, device=device, progress=progress, force=force, log=log)


def test_reproduce_runs_every_stage_and_writes_the_combined_report(tmp_path, monkeypatch):
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": TINY})
    out = tmp_path / "rep"
    res = reproduce(out, "digits", ["small_cnn"], "cpu", device="cpu", paper_recipe_for=("small_cnn",),
                      progress=False, log=lambda m: None)
    assert (out / "small_cnn" / "eval" / "table1.json").exists()
    assert (out / "small_cnn" / "explain" / "report.md").exists()
    assert (out / "small_cnn-paper-recipe" / "filters.safetensors").exists()
    models = [(r["model"], r["recipe"]) for r in res["table1"]]
    assert ("WF-Net", "tuned") in models and ("WF-Net", "paper") in models and ("original", "tuned") in models
    baseline = [r for r in res["table1"] if r["method"] == "random-labels"]
    assert baseline and baseline[0]["classes"] == [0, 1]
    t1 = json.loads((out / "small_cnn" / "eval" / "table1.json").read_text())
    assert t1["test_images"] == 100 and t1["test_images_total"] == 150  # Table 1 on the profile's test subset
    assert "subset of 100 of the 150 test images" in (out / "small_cnn" / "eval" / "table1.md").read_text()
    insdel = json.loads((out / "small_cnn" / "eval" / "insdel_wfnet.json").read_text())
    assert insdel["params"]["test_images"] == 100  # explain reused Table 2's curves (same subset), no recompute
    summary = json.loads((out / "small_cnn" / "untrain_summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped"] == "reached max_steps=2"
    md = (out / "combined.md").read_text()
    assert "| small_cnn | WF-Net (paper recipe) |" in md and "Wall time per stage" in md and "[0, 1]" in md
    assert (out / "combined.png").stat().st_size > 0
    timing = json.loads((out / "timing" / "small_cnn.json").read_text())
    assert {"train", "untrain", "baseline_random-labels", "evaluate", "explain", "untrain_paper_recipe"} <= set(timing)
    first = dict(timing)
    reproduce(out, "digits", ["small_cnn"], "cpu", device="cpu", paper_recipe_for=("small_cnn",),
                progress=False, log=lambda m: None)
    again = json.loads((out / "timing" / "small_cnn.json").read_text())
    for stage in ("train", "untrain"):  # skipped (already done): only the check is added to the stage's time
        assert first[stage] <= again[stage] < first[stage] + 5.0


def test_reproduce_cli_rejects_unknown_models_and_profiles(capsys):
    assert main(["reproduce", "--models", "vgg16,nope", "--no-progress"]) == 2
    assert main(["reproduce", "--profile", "gpu", "--no-progress"]) == 2


def test_reproduce_after_an_edited_profile_refuses_then_force_replaces_and_redoes_the_tables(tmp_path, monkeypatch):
    import pytest

    from wfnet.run import RunError

    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": TINY})
    out = tmp_path / "rep"
    args = dict(dataset="digits", models=["small_cnn"], profile="cpu", device="cpu", paper_recipe_for=("small_cnn",),
                progress=False, log=lambda m: None)
    reproduce(out, **args)
    run = out / "small_cnn"
    t1_before = (run / "eval" / "table1.json").stat().st_mtime_ns
    rl_before = json.loads((run / "eval" / "acc_random-labels.json").read_text())
    rl_mtime = (run / "eval" / "acc_random-labels.json").stat().st_mtime_ns
    edited = {**TINY, "untrain": {**TINY["untrain"], "max_steps": 3}}
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": edited})
    with pytest.raises(RunError, match="max_steps: 2 -> 3"):
        reproduce(out, **args)
    assert json.loads((run / "untrain_summary.json").read_text())["steps"] == 2  # the old gates are untouched
    reproduce(out, force=True, **args)
    for folder in (run, out / "small_cnn-paper-recipe"):
        assert json.loads((folder / "untrain_summary.json").read_text())["steps"] == 3
    assert (run / "eval" / "table1.json").stat().st_mtime_ns > t1_before
    assert (run / "explain" / "report.md").exists()
    # evaluate was redone in full: the untouched baseline's rows were recomputed too (same values, new file)
    assert (run / "eval" / "acc_random-labels.json").stat().st_mtime_ns > rl_mtime
    assert json.loads((run / "eval" / "acc_random-labels.json").read_text())["per_class"] == rl_before["per_class"]
    timing = json.loads((out / "timing" / "small_cnn.json").read_text())
    assert "redo" not in timing and timing["total"] == round(sum(v for k, v in timing.items() if k != "total"), 1)
    # a second forced run with the same options replaces nothing
    steps_file = (run / "filters.safetensors").stat().st_mtime_ns
    reproduce(out, force=True, **args)
    assert (run / "filters.safetensors").stat().st_mtime_ns == steps_file


def test_reproduce_force_replaces_baselines_made_with_other_options_only(tmp_path, monkeypatch):
    import pytest

    from wfnet.checkpoint import read_state_meta
    from wfnet.run import RunError

    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": TINY})
    out = tmp_path / "rep"
    args = dict(dataset="digits", models=["small_cnn"], profile="cpu", device="cpu", paper_recipe_for=(),
                progress=False, log=lambda m: None)
    reproduce(out, **args)
    model = out / "small_cnn" / "baselines" / "random-labels" / "class_0.safetensors"
    gates = (out / "small_cnn" / "filters.safetensors").stat().st_mtime_ns
    edited = {**TINY, "baseline_options": {"max_steps": 3}}
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": edited})
    with pytest.raises(RunError, match="max_steps: 2 -> 3"):
        reproduce(out, **args)
    assert read_state_meta(model)["options"]["max_steps"] == 2
    reproduce(out, force=True, **args)
    assert read_state_meta(model)["options"]["max_steps"] == 3
    assert (out / "small_cnn" / "filters.safetensors").stat().st_mtime_ns == gates  # same untraining: kept
    rows = json.loads((out / "small_cnn" / "eval" / "table1.json").read_text())["rows"]
    assert any(r["method"] == "random-labels" for r in rows)


def test_combined_report_names_a_backbone_made_with_other_settings_than_the_profile(tmp_path, monkeypatch):
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": TINY})
    out = tmp_path / "rep"
    res = reproduce(out, "digits", ["small_cnn"], "cpu", device="cpu", paper_recipe_for=("small_cnn",),
                      progress=False, log=lambda m: None)
    assert res["made_otherwise"] == {} and "Made with other settings" not in res["markdown"]
    edited = {**TINY, "untrain": {**TINY["untrain"], "max_steps": 3}, "baseline_options": {"max_steps": 4}}
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": edited})
    report = R.combined_tables(out, "digits", ["small_cnn"], "cpu")  # e.g. another process's backbone, not rerun
    found = report["made_otherwise"]["small_cnn"]
    assert any("tuned recipe" in d and "max_steps: 2 -> 3" in d for d in found)
    assert any("paper recipe" in d for d in found) and "baseline random-labels" in found
    assert "Made with other settings" in (out / "combined.md").read_text()



@pytest.mark.parametrize("stage", ["train", "untrain"])
def test_reproduce_killed_during_a_stage_counts_the_killed_process_time(tmp_path, monkeypatch, stage):
    """A process killed in training (after its first epoch) or untraining (at its first checkpoint), whose first
    batch / step is slowed to >= 2 s: the resumed run's timing file counts the killed process's time (kept in the
    state file), not only its own."""
    import time

    import wfnet.train as T
    import wfnet.untrain as U
    from wfnet.checkpoint import read_state_meta

    module, slow_name = (T, "random_shift") if stage == "train" else (U, "untrain_step")
    tiny = {**TINY, "train": {**TINY["train"], "epochs": 2}} if stage == "train" else TINY
    monkeypatch.setitem(R.PROFILES, "cpu", {"small_cnn": tiny})
    out = tmp_path / "rep"
    real_save, real_slow = module.save_state, getattr(module, slow_name)

    def killed_at_first_checkpoint(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt("killed")

    def slow_once(*a, **k):
        time.sleep(2.0)
        monkeypatch.setattr(module, slow_name, real_slow)
        return real_slow(*a, **k)

    monkeypatch.setattr(module, "save_state", killed_at_first_checkpoint)
    monkeypatch.setattr(module, slow_name, slow_once)
    run = lambda: reproduce(out, "digits", ["small_cnn"], "cpu", device="cpu", paper_recipe_for=(),  # noqa: E731
                              progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, "save_state", real_save)
    meta = read_state_meta(out / "small_cnn" / f"{stage}_state.safetensors")
    killed = meta["seconds"] if stage == "train" else meta["state"]["seconds"]
    timing_file = out / "timing" / "small_cnn.json"
    assert killed >= 2.0 and stage not in (json.loads(timing_file.read_text()) if timing_file.exists() else {})
    run()
    assert json.loads(timing_file.read_text())[stage] > killed  # the killed part plus the resumed run's own


def test_reproduce_over_seeds_reports_mean_and_std_of_table1_and_the_audit(tmp_path, monkeypatch):
    """`wfnet reproduce --seeds 0,1` on a tiny audit profile: one folder per seed with the seed in every stage's
    options, then OUT/seeds.{md,json} with mean and std over the seeds of Acc_r / Acc_f / ZRF and the audit."""
    import numpy as np

    from wfnet.checkpoint import read_state_meta
    from wfnet.run import Run

    tiny = {**TINY, "baselines": {"ssd": [0], "random-labels": [0]},
            "baseline_options": {"max_steps": 2, "ssd_alpha": 50.0}, "eval": {"metrics": ["acc", "zrf"]},
            "audit": {"audit_samples": 40, "audit_shots": [5], "audit_steps": 2, "retain_steps": 2,
                      "retain_samples": 40},
            "audit_metrics": ["mia", "relearn_retain"], "explain": False}
    monkeypatch.setitem(R.PROFILES, "audit", {"small_cnn": tiny})
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out), "--dataset", "digits", "--models", "small_cnn", "--profile",
                 "audit", "--seeds", "0,1", "--device", "cpu", "--no-progress"]) == 0
    for seed in (0, 1):
        run = Run.open(out / f"seed_{seed}" / "small_cnn")
        assert run.config["train"]["seed"] == seed and run.untrain_options()["seed"] == seed
        assert read_state_meta(run.baseline_dir("random-labels") / "class_0.safetensors")["options"]["seed"] == seed
        audit = json.loads((out / f"seed_{seed}" / "small_cnn" / "eval" / "audit.json").read_text())
        assert audit["protocol"]["seed"] == seed and audit["classes"] == [0]
        assert not (out / f"seed_{seed}" / "small_cnn" / "explain").exists()
        assert "made with other settings" not in (out / f"seed_{seed}" / "combined.md").read_text().lower()
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    rows = summary["table"]["small_cnn"]
    assert {"original", "WF-Net", "SSD", "random labels"} <= set(rows)
    per_seed = [json.loads((out / f"seed_{s}" / "small_cnn" / "eval" / "table1.json").read_text()) for s in (0, 1)]
    acc_f = [next(r["acc_f"] for r in t["rows"] if r["method"] == "wfnet") for t in per_seed]
    assert rows["WF-Net"]["acc_f"]["values"] == acc_f
    assert rows["WF-Net"]["acc_f"]["mean"] == pytest.approx(np.mean(acc_f))
    assert rows["WF-Net"]["acc_f"]["std"] == pytest.approx(np.std(acc_f, ddof=1))
    assert rows["WF-Net"]["relearn_retain"]["n"] == 2 and "mia" in rows["SSD"]
    md = (out / "seeds.md").read_text()
    assert "Mean ± std over seeds [0, 1]" in md and "| WF-Net |" in md and "±" in md
    with pytest.raises(ValueError, match="distinct seeds"):
        R.run(R.ReproduceConfig(out=str(out), dataset="digits", models=["small_cnn"], profile="audit",
                                seeds=[1, 1]), device="cpu", progress=False, log=lambda m: None)
