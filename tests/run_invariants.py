"""What a run folder must satisfy at every moment, whatever was killed when (used by test_run.py and
test_run_kill.py): every result names the model it was computed from, and that model is the one the folder holds."""
import json
import os
from pathlib import Path

from wfnet import Run
from wfnet.checkpoint import read_state_meta


def check_run_folder(path) -> dict:
    """Open the folder as any command would (finishing a half-done commit) and assert the invariants. Returns
    ``{"original": stamp, "wfnet": stamp, "untrain": options, "baselines": {method: options}, "pending": {...}}``
    for what it holds."""
    path = Path(path)
    held = {"baselines": {}, "pending": {}}
    if not (path / "config.json").exists():
        assert not path.exists() or os.listdir(path) == [], os.listdir(path)
        return held
    run = Run.open(path)
    for p in path.rglob("*"):
        assert not p.name.startswith((".staged-", ".commit.json", ".stale")), p
        assert not p.name.endswith(".wfnet-tmp"), p
    if (path / "original.safetensors").exists():
        held["original"] = run.original_info()["stamp"]  # checks its training options against config.json
    else:  # an interrupted training: nothing derived from a model may exist
        assert sorted(os.listdir(path)) in (["config.json"], ["config.json", "train_state.safetensors"]), \
            os.listdir(path)
        return held
    derived = sorted(n for n in ("results.json", "results.md", "untrain_summary.json") if (path / n).exists())
    meta = run.filters_meta()
    if meta:
        assert meta["original_stamp"] == held["original"]
        assert derived == ["results.json", "results.md", "untrain_summary.json"], derived
        for name in ("results.json", "untrain_summary.json"):
            res = json.loads((path / name).read_text())
            assert res["filters_stamp"] == meta["stamp"] and res["untrain"] == meta["untrain"], name
        assert run.results() is not None
        held["wfnet"], held["untrain"] = meta["stamp"], meta["untrain"]
    else:
        assert derived == [] and not (path / "explain").exists(), derived
    if (path / "untrain_state.safetensors").exists():
        assert "config" in read_state_meta(path / "untrain_state.safetensors")
    for name in ("table1", "table2"):
        assert (path / "eval" / f"{name}.json").exists() == (path / "eval" / f"{name}.md").exists(), name
    table = path / "eval" / "table1.json"
    if table.exists():
        for method, stamps in json.loads(table.read_text())["stamps"].items():
            for c, stamp in stamps.items():
                assert run.model_stamp(method, int(c)) == stamp, (method, c)
    report = path / "explain" / "report.md"
    if report.exists():
        assert f"stamp `{held['wfnet']}`" in report.read_text()
    for d in sorted((path / "baselines").glob("*")) if (path / "baselines").exists() else []:
        metas = {int(p.stem.split("_")[1]): read_state_meta(p) for p in d.glob("class_*.safetensors")}
        options = {json.dumps(m["options"], sort_keys=True) for m in metas.values()}
        assert len(options) <= 1, (d, options)  # never models of two configurations side by side
        for c, m in metas.items():
            assert m["class"] == c and m["original_stamp"] == held["original"]
        if d.name.startswith(".pending-"):
            held["pending"][d.name[len(".pending-"):]] = metas and next(iter(metas.values()))["options"]
            continue
        assert metas, d  # a method folder holds models
        summary = json.loads((d / "summary.json").read_text())
        assert sorted(int(c) for c in summary["seconds"]) == sorted(metas)
        assert summary["options"] == next(iter(metas.values()))["options"]
        held["baselines"][d.name] = summary["options"]
    return held
