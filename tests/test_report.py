"""Tests of the evaluate and explain stages (wfnet.evaluate.run / wfnet.explain.run, rendered by wfnet.report) on a fake run: a tiny CNN trained for a second on tiny
synthetic data, random gates, and two baselines (one on a subset of classes)."""
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import wfnet
from wfnet import metrics as M
from wfnet import paper
from wfnet import evaluate as E
from wfnet import explain as X
from wfnet.errors import RunError

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))


def _blobs(n_per_class, seed):
    """Class k = a bright 3x3 patch at position k of an 8x8 noisy image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat(n_per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=g) * 0.3
    for k in range(K):
        x[y == k, 0, 2 * k:2 * k + 3, 2 * k:2 * k + 3] += 2.0
    return TensorDataset(x, y)


def _fresh(seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _tiny_cnn()


@functools.lru_cache(maxsize=1)
def _trained_state():
    """The 'original model': trained once per session (about 1 s), shared by every fake run."""
    net = _fresh(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = _blobs(30, 0).tensors
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


class FakeRun:
    """The Run protocol of wfnet.Run, with call counters to observe caching."""

    def __init__(self, run_dir, dataset="blobs", model="tinycnn"):
        self.run_dir = Path(run_dir)
        self.config = {"model": model, "dataset": dataset, "num_classes": K, "seed": 0, "device": "cpu"}
        self.num_classes = K
        self.class_names = ["left", "middle", "right"]
        self.device = torch.device("cpu")
        self.data = SimpleNamespace(train=_blobs(30, 0), val=_blobs(5, 1), test=_blobs(10, 2), num_classes=K,
                                    class_names=self.class_names)
        self.calls = {"wrapped": 0, "baseline_model": 0, "build_model": 0, "original_model": 0}
        self._original = _trained_state()
        g = torch.Generator().manual_seed(5)
        wf = wfnet.wrap(_fresh(0), K)
        self._alphas = {n: 3 + 3 * torch.randn(p.shape, generator=g) for n, p in wf.named_filter_parameters()}

    def _fresh(self, seed):
        return _fresh(seed)

    def build_model(self, seed):
        self.calls["build_model"] += 1
        return self._fresh(seed).eval()

    def original_model(self):
        self.calls["original_model"] += 1
        m = self._fresh(0)
        m.load_state_dict(self._original)
        return m.eval()

    def model_stamp(self, method, c=None):
        return "fake"

    def wrapped(self):
        self.calls["wrapped"] += 1
        wf = wfnet.wrap(self.original_model(), K)
        with torch.no_grad():
            for n, p in wf.named_filter_parameters():
                p.copy_(self._alphas[n])
        return wf.eval()

    def baseline_methods(self):
        return ["retrain", "random-labels"]

    def baseline_classes(self, method):
        return [0, 1, 2] if method == "retrain" else [0, 2]

    def baseline_model(self, method, c):
        self.calls["baseline_model"] += 1
        # "retrain": an untrained network (forgets everything); "random-labels": the original (forgets nothing)
        return self.build_model(100 + c) if method == "retrain" else self.original_model()


FAST = dict(rt_max_epochs=2, rt_samples=16, rt_batch_size=8, insdel_steps=5)


def evaluate_run(run, force=False, **options):
    """The evaluate stage with FAST's options under ``options``."""
    return E.run(run, E.EvalConfig(**{**FAST, **options}), force=force, progress=False)


def explain_run(run, force=False, **options):
    return X.run(run, X.ExplainConfig(**options), force=force, progress=False)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = FakeRun(tmp_path_factory.mktemp("run"))
    tables = evaluate_run(run)
    return run, tables


def test_evaluate_run_writes_tables(evaluated):
    run, tables = evaluated
    ev = run.run_dir / "eval"
    for name in ("table1.md", "table1.json", "table2.md", "table2.json"):
        assert (ev / name).exists()
    assert json.loads((ev / "table1.json").read_text()) == tables["table1"]
    rows = {r["method"]: r for r in tables["table1"]["rows"]}
    assert list(rows) == ["original", "retrain", "random-labels", "wfnet"]
    assert rows["random-labels"]["classes"] == [0, 2]
    # the original model on every class, and the "baseline" that is the original, have Acc_f = their accuracy
    orig = rows["original"]
    assert orig["acc_f"] > 80 and orig["rt"] == "-"
    assert rows["random-labels"]["acc_f"] > 80
    # a model that already knows the class relearns in 0 epochs (checked before any epoch)
    assert rows["random-labels"]["rt_mean"] == 0.0 and rows["random-labels"]["rt"] == "0.0 (0)"
    for r in rows.values():
        assert 0 <= r["acc_r"] <= 100 and 1 - 0.6932 <= r["zrf"] <= 1
    md = (ev / "table1.md").read_text()
    assert "| WF-Net |" in md and "| random labels (2 classes) |" in md and "paper" not in md.split("\n")[4]
    t2 = tables["table2"]["rows"][0]
    assert 0 <= t2["insertion"] <= 1.5 and 0 <= t2["deletion"] <= 1.5 and tables["table2"]["steps"] == \
        [0.0, 0.25, 0.5, 0.75, 1.0]


def test_evaluate_run_matches_the_metric_functions(evaluated):
    run, tables = evaluated
    wf = run.wrapped()
    loader = torch.utils.data.DataLoader(run.data.test, batch_size=50)
    direct = M.accuracy_forget_retain(lambda c: (lambda x: wf(x, forget=c)), loader, range(K))
    row = next(r for r in tables["table1"]["rows"] if r["method"] == "wfnet")
    assert row["acc_f"] == pytest.approx(direct["acc_f"]) and row["acc_r"] == pytest.approx(direct["acc_r"])
    idx = torch.nonzero(run.data.test.tensors[1] == 1).flatten().tolist()
    sub = torch.utils.data.DataLoader(torch.utils.data.Subset(run.data.test, idx), batch_size=7)
    z = M.zrf_score(lambda x: wf(x, forget=1), run.build_model(12345), sub)
    assert row["per_class"]["1"]["zrf"] == pytest.approx(z, abs=1e-9)
    ins = M.insertion_deletion(wf, 1, sub, steps=5)
    per = tables["table2"]["rows"][0]["per_class"]["1"]
    assert per["insertion"] == pytest.approx(ins["insertion"]["auc"]) and per["deletion"] == pytest.approx(
        ins["deletion"]["auc"])


def test_evaluate_run_reuses_cache_unless_forced(tmp_path):
    run = FakeRun(tmp_path)
    first = evaluate_run(run, metrics=["acc", "zrf", "rt"], methods=["original", "retrain"])
    before = dict(run.calls)
    again = evaluate_run(run, metrics=["acc", "zrf", "rt"], methods=["original", "retrain"])
    assert run.calls == before  # nothing recomputed, no model even built
    assert again["table1"] == first["table1"]
    # a changed RT parameter recomputes RT only
    evaluate_run(run, metrics=["acc", "zrf", "rt"], methods=["original", "retrain"], rt_samples=8)
    assert run.calls["baseline_model"] == before["baseline_model"] + K
    mid = dict(run.calls)
    evaluate_run(run, metrics=["acc"], methods=["retrain"], force=True)
    assert run.calls["baseline_model"] == mid["baseline_model"] + K


def test_evaluate_run_paper_numbers_side_by_side(tmp_path):
    run = FakeRun(tmp_path, dataset="MNIST", model="vgg16")
    tables = evaluate_run(run, metrics=["acc"], methods=["original", "wfnet"])
    rows = {r["method"]: r for r in tables["table1"]["rows"]}
    assert rows["wfnet"]["paper"]["acc_r"] == 73.2 and rows["wfnet"]["paper"]["rt"] == "27.6 (1)"
    assert rows["original"]["paper"]["zrf"] == pytest.approx(0.480)
    assert rows["wfnet"]["zrf"] is None and rows["wfnet"]["rt"] == "n/a"  # not computed: shown as n/a
    md = (run.run_dir / "eval" / "table1.md").read_text()
    assert "paper Acc_r" in md and "73.20" in md and "79.2" in md
    t2 = tables["table2"]
    assert t2["rows"][0]["paper"] == {"insertion": 0.78, "deletion": 0.09} and "0.78" in (
        run.run_dir / "eval" / "table2.md").read_text()


def test_evaluate_run_rejects_bad_arguments(tmp_path):
    run = FakeRun(tmp_path)
    with pytest.raises(RunError, match="unknown metric"):
        evaluate_run(run, metrics=["accuracy"])
    with pytest.raises(RunError, match="not in this run"):
        evaluate_run(run, methods=["finetune"])
    with pytest.raises(RunError, match="out of range"):
        evaluate_run(run, classes=[5])


def test_explain_run_writes_figures_and_report(evaluated):
    run, _ = evaluated
    calls = dict(run.calls)
    out = explain_run(run, insdel_steps=5)
    exp = run.run_dir / "explain"
    names = ["gates_heatmap.png", "filter_map_0.png", "filter_map_2.png", "insertion_deletion.png"]
    for name in names:
        assert (exp / name).read_bytes()[:4] == b"\x89PNG"
    report = (exp / "report.md").read_text()
    for name in names:
        assert f"]({name})" in report
    assert out["report"] == exp / "report.md"
    assert run.calls["wrapped"] == calls["wrapped"] + 1  # the insertion/deletion curves came from the cache
    stamp = (exp / "gates_heatmap.png").stat().st_mtime_ns
    explain_run(run, insdel_steps=5)
    assert (exp / "gates_heatmap.png").stat().st_mtime_ns == stamp
    explain_run(run, layers=["2"], force=True, insdel_steps=5)
    assert (exp / "gates_heatmap.png").stat().st_mtime_ns != stamp
    with pytest.raises(RunError, match="not filtered layers"):
        explain_run(run, layers=["6"])


def test_paper_lookup_normalises_names():
    rows = paper.table1_rows("CIFAR-10", "ResNet-18")
    assert rows["wfnet"]["acc_f"] == 9.25 and rows["wfnet"]["rt"] == "94.3 (9)" and rows["wfnet"]["rt_never"] == 9
    assert rows["retrain"]["rt_mean"] is None and rows["retrain"]["rt_never"] == 10  # ">100 (10)"
    assert rows["original"]["zrf"] == pytest.approx(0.48) and rows["original"]["rt"] is None
    assert paper.table1_rows("ImageNet-1k", "vit_small_patch16_224")["wfnet"]["zrf"] == 0.45
    assert "retrain" not in paper.table1_rows("imagenet", "vgg16")
    assert paper.table2_row("mnist", "ViT-T") == {"insertion": 0.90, "deletion": 0.07}
    assert paper.table1_rows("FashionMNIST", "vgg16") is None and paper.table2_row("mnist", "small_cnn") is None
    assert paper.normalise_method("Random labels") == "random-labels" and paper.normalise_method("x") is None


def test_table2_md_says_when_insdel_was_not_computed():
    from wfnet.report import table2_md
    row = {"model": "WF-Net", "insertion": None, "deletion": None}
    t = {"dataset": "mnist", "backbone": "resnet18", "paper_available": False, "rows": [row], "steps": []}
    md = table2_md(t, "runs/x")
    assert "were not computed" in md and "evenly spaced" not in md
    t = {**t, "rows": [{**row, "insertion": 0.8, "deletion": 0.1}], "steps": [0.0, 0.5, 1.0]}
    md = table2_md(t, "runs/x")
    assert "(3 evenly spaced steps" in md and "0.800" in md
