"""The orchestration layout (issue 25 items 1, 2 and 6): stage modules own their configs and a ``run(run, cfg)``;
``Run`` imports no stage; one home for seeds, model names and the hard-export threshold; the audit is cached;
``--forget`` takes class names."""
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import wfnet
from wfnet import audit, baselines, evaluate, explain, reproduce, train, untrain
from wfnet.cli import CLIError, class_ids
from wfnet.models import MODEL_NAMES, MODELS, ModelEntry, build_model, min_image_size, register_model
from wfnet.seeds import derive_seed

PKG = Path(wfnet.__file__).parent
STAGES = {train: "TrainConfig", untrain: "UntrainConfig", baselines: "BaselineConfig", evaluate: "EvalConfig",
          audit: "AuditConfig", explain: "ExplainConfig", reproduce: "ReproduceConfig"}


@pytest.mark.parametrize("module", list(STAGES), ids=lambda m: m.__name__)
def test_each_stage_owns_its_config_and_a_run_function(module):
    cfg = getattr(module, STAGES[module])
    assert dataclasses.is_dataclass(cfg) and cfg.__module__ == module.__name__
    params = list(inspect.signature(module.run).parameters.values())
    # run(run, cfg, ...) -- reproduce has no single run folder: run(cfg, ...); audit also takes what evaluate asks
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert names[:2] == (["cfg", "device"][:1] + names[1:2] if module is reproduce else ["run", "cfg"])
    # no option is restated as a keyword with its own default: keyword-only flags say how, not what
    kwonly = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert kwonly <= {"force", "resume", "progress", "device", "log"}, kwonly


def _function_local_imports(path: Path, wfnet_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if not wfnet_only or (isinstance(node, ast.ImportFrom) and node.level >= 1):
                        out.append(f"{path.name}:{node.lineno}")
    return out


def test_run_imports_at_the_top_and_no_stage():
    """Run manages folders, stamps and commits: it imports no stage module (no run <-> stage cycle) and nothing
    inside its functions; the stage modules import at the top too."""
    tree = ast.parse((PKG / "run.py").read_text())
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert not imported & {"train", "untrain", "baselines", "evaluate", "audit", "explain", "reproduce"}
    for name in ("run.py", "train.py", "untrain.py", "baselines.py", "evaluate.py", "explain.py", "reproduce.py",
                 "config.py"):
        assert _function_local_imports(PKG / name) == [], name
    # models.py imports torchvision / timm inside the builders that need them (seconds each, for one model family)
    assert _function_local_imports(PKG / "models.py", wfnet_only=True) == []
    assert not any(hasattr(wfnet.Run, m) for m in ("train", "untrain", "baselines", "evaluate", "explain"))


def test_derive_seed_is_deterministic_and_separates_streams():
    assert derive_seed(0, "shift", 3) == derive_seed(0, "shift", 3)
    # the collisions of arithmetic schemes: seed 1 / key 0 vs seed 0 / key 1 (seed + epoch), seed*1000 + c
    assert derive_seed(1, "x", 0) != derive_seed(0, "x", 1)
    assert derive_seed(1, "random-labels", 0) != derive_seed(0, "random-labels", 1000)
    assert derive_seed(0, "shift", 1) != derive_seed(0, "data-order", 1)
    assert 0 <= derive_seed(2**40, "a") < 2**63
    with pytest.raises(TypeError):
        derive_seed(0, 1.5)
    with pytest.raises(TypeError):
        derive_seed("0")


def test_no_arithmetic_seeds_left():
    """Every derived seed goes through derive_seed (issue 25: seed*7919+epoch, seed*1000+c, seed+12345, 1_000_003)."""
    for path in PKG.glob("*.py"):
        if path.name == "seeds.py":  # its docstring names them
            continue
        text = path.read_text()
        for pattern in ("7919", "1_000_003", "* 1000 + c", "+ 12345", "seed + epoch", "seed + 1)", "* 1009 + size"):
            assert pattern not in text, (path.name, pattern)
        # the general shape too (set_eval.random_sets had seed * 1009 + size): seed combined arithmetically
        hit = re.search(r"\bseed\s*[*+]\s*(\d|epoch|step|size|c\b)", text)
        assert hit is None, (path.name, hit and hit.group(0))


def test_model_registry_is_the_one_list_of_names():
    assert MODEL_NAMES == tuple(MODELS) and "small_cnn" in MODELS and min_image_size("vgg16") == 32
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn", MODELS["small_cnn"])
    built = []
    register_model("tiny_test_net", ModelEntry(lambda *a: built.append(a) or wfnet.models.SmallCNN(3, 1, (4,))))
    try:
        m = build_model("tiny_test_net", 3, 1, 8)
        assert built and sum(p.numel() for p in m.parameters()) > 0
        with pytest.raises(ValueError, match="patch_size applies to vision transformers"):
            build_model("tiny_test_net", 3, 1, 8, patch_size=4)
    finally:
        del MODELS["tiny_test_net"]
    with pytest.raises(ValueError, match="needs inputs of at least 32 px"):
        build_model("vgg16", 10, 1, 16)


def test_hard_export_threshold_has_one_home():
    from wfnet.model import HARD_EXPORT_THRESHOLD

    assert audit.AuditConfig().hard_threshold == HARD_EXPORT_THRESHOLD
    src = (PKG / "cli.py").read_text()
    assert "-1.0" not in src and "HARD_EXPORT_THRESHOLD" in src


def test_forget_takes_class_ids_and_names():
    names = ["cat", "dog", "7"]
    assert class_ids("0,2", names, "--forget") == [0, 2]
    assert class_ids("dog,cat", names, "--forget") == [1, 0]
    assert class_ids("7", names, "--forget") == [2]  # a name first: digits-like names equal to other ids
    for bad, match in (("cow", "neither a class id nor a class name"), ("3", "out of range"),
                       ("cat,0", "names a class twice"), ("", "no class")):
        with pytest.raises(CLIError, match=match):
            class_ids(bad, names, "--forget")


def test_demo_is_a_profile_of_reproduce():
    for name in ("demo", "demo-quick"):
        entry = reproduce.PROFILES[name]["small_cnn"]
        train.TrainConfig(**entry["train"])
        evaluate.EvalConfig(**entry["eval"])
        baselines.BaselineConfig(**entry["baseline_options"])
    assert "audit" in reproduce.PROFILES["demo"]["small_cnn"] and "audit" not in reproduce.PROFILES["demo-quick"][
        "small_cnn"]


def test_audit_is_cached_until_a_model_or_the_request_changes(tmp_path, monkeypatch):
    from test_report import FakeRun

    run = FakeRun(tmp_path)
    calls = {"n": 0}
    real = audit.run_audit

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(audit, "run_audit", counted)
    cfg = evaluate.EvalConfig(metrics=["mia"], methods=["original", "wfnet"],
                              audit=audit.AuditConfig(audit_samples=20))
    first = evaluate.run(run, cfg, progress=False)["audit"]
    again = evaluate.run(run, cfg, progress=False)["audit"]
    assert calls["n"] == 1 and again.get("cached") and again["mean"] == first["mean"]
    assert again["markdown"] == first["markdown"]
    evaluate.run(run, dataclasses.replace(cfg, audit=audit.AuditConfig(audit_samples=21)), progress=False)
    assert calls["n"] == 2  # other options: recomputed
    monkeypatch.setattr(run, "model_stamp", lambda method, c=None: "new" if method == "wfnet" else "fake")
    evaluate.run(run, dataclasses.replace(cfg, audit=audit.AuditConfig(audit_samples=21)), progress=False)
    assert calls["n"] == 3  # new gates: recomputed
    evaluate.run(run, dataclasses.replace(cfg, audit=audit.AuditConfig(audit_samples=21)), force=True,
                 progress=False)
    assert calls["n"] == 4
