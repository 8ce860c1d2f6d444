"""SSD (wfnet.ssd) and the retain-only relearning attack (wfnet.retain_relearn): small, CPU-only."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from wfnet.retain_relearn import relearn_retain, retain_pool
from wfnet.ssd import fisher_importance, ssd_dampen, ssd_unlearn


def _blobs(n_per=40, classes=8, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat([centers[c] + torch.randn(n_per, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per)
    return x, y


def _mlp(dim=8, classes=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))


def _trained():
    x, y = _blobs()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def _acc(model, x, y, mask):
    with torch.no_grad():
        return float((model(x[mask]).argmax(1) == y[mask]).float().mean())


def test_fisher_importance_is_mean_squared_batch_gradient():
    model = _mlp()
    x, y = _blobs(n_per=8)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    expect = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for bx, by in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(bx), by), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expect[n] += g.pow(2) / 2
    for p in model.parameters():
        p.requires_grad_(False)  # frozen parameters are measured too, and stay frozen
    imp, samples = fisher_importance(model, batches)
    assert samples == 64
    assert set(imp) == set(expect)
    for n in imp:
        torch.testing.assert_close(imp[n], expect[n])
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no batch"):
        fisher_importance(model, [])


def test_ssd_dampen_selects_and_scales_exactly():
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    i_d = {"weight": torch.tensor([[1.0, 1.0, 1.0, 0.0]])}
    i_f = {"weight": torch.tensor([[5.0, 20.0, 40.0, 1.0]])}
    # alpha 10: elements 2, 3 (40 > 10, 1 > 0) selected; element 1 (20 > 10) too; element 0 (5) not
    n, total, per = ssd_dampen(model, i_f, i_d, alpha=10, lam=1)
    assert (n, total, per) == (3, 4, {"weight": 3})
    # beta = min(lam * I_D / I_f, 1): 1/20, 1/40, 0/1
    torch.testing.assert_close(model.weight, torch.tensor([[1.0, 2.0 / 20, 3.0 / 40, 0.0]]))
    with pytest.raises(ValueError, match="alpha"):
        ssd_dampen(model, i_f, i_d, alpha=0, lam=1)
    with pytest.raises(ValueError, match="lambda"):
        ssd_dampen(model, i_f, i_d, alpha=1, lam=float("nan"))
    with pytest.raises(ValueError, match="different parameters"):
        ssd_dampen(model, i_f, {}, alpha=1, lam=1)
    with pytest.raises(ValueError, match="shape"):
        ssd_dampen(model, {"weight": torch.ones(4)}, {"weight": torch.ones(4)})


def test_ssd_unlearn_forgets_the_class_and_keeps_the_others():
    model, x, y = _trained()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    c = 1
    full = DataLoader(TensorDataset(x, y), batch_size=32)
    forget = DataLoader(TensorDataset(x[y == c], y[y == c]), batch_size=32)
    assert _acc(model, x, y, y == c) == 1.0
    # on this 8-class toy MLP alpha 10 selects too little (Acc_f stays 0.97); alpha 5 forgets class 1 (0.0)
    res = ssd_unlearn(model, forget, full, alpha=5, lam=1)
    assert _acc(res.model, x, y, y == c) < 0.2
    assert _acc(res.model, x, y, y != c) > 0.9
    assert 0 < res.dampened < res.total and res.samples == 40 and res.full_samples == 320
    assert res.seconds > 0 and res.full_seconds > 0
    for n, p in model.state_dict().items():  # the input model is untouched
        assert torch.equal(p, before[n])
    # full-data importances computed once are reused: same model, no full-data cost
    imp, _ = fisher_importance(model, full)
    res2 = ssd_unlearn(model, forget, full_importance=imp, alpha=5, lam=1)
    assert res2.full_seconds == 0 and res2.full_samples == 0
    for (n, p), q in zip(res.model.state_dict().items(), res2.model.state_dict().values()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="full_loader or full_importance"):
        ssd_unlearn(model, forget)


def test_relearn_retain_budget_and_refusals():
    model, x, y = _trained()
    c = 2
    gen = torch.Generator().manual_seed(0)
    idx = retain_pool(y, c, 50, gen)
    assert len(idx) == 50 and bool((y[idx] != c).all())
    before = {n: p.clone() for n, p in model.state_dict().items()}
    params = lambda m: list(m.parameters())  # noqa: E731
    fwd = lambda m, t: m(t)  # noqa: E731
    # a negligible step keeps the model as it was: Acc_f of the original (1.0) ...
    assert relearn_retain(model, fwd, params, x[idx], y[idx], x, y, c, "cpu", steps=1, lr=1e-12) == 1.0
    # ... and of a model whose class-c logit is suppressed (0.0)
    shallow = nn.Sequential(model, nn.Linear(8, 8))
    with torch.no_grad():
        shallow[1].weight.copy_(torch.eye(8))
        shallow[1].bias.copy_(-100.0 * (torch.arange(8) == c))
    assert relearn_retain(shallow, fwd, params, x[idx], y[idx], x, y, c, "cpu", steps=1, lr=1e-12) == 0.0
    # a real budget changes the copy only
    relearn_retain(model, fwd, params, x[idx], y[idx], x, y, c, "cpu", steps=20)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="forgotten class 2"):
        relearn_retain(model, fwd, params, x, y, x, y, c, "cpu")
    with pytest.raises(ValueError, match="empty"):
        relearn_retain(model, fwd, params, x[:0], y[:0], x, y, c, "cpu")
    with pytest.raises(ValueError, match="no sample outside"):
        retain_pool(torch.full((5,), 2), 2, 10, gen)


def test_ssd_baseline_per_class_with_its_cost(tmp_path, capsys):
    """`wfnet baselines --methods ssd`: one dampened model per class, its seconds and samples in the metadata, the
    full-data importances shared; an SSD option change needs --force and leaves the other baselines alone."""
    import json

    from wfnet.checkpoint import read_state_meta
    from wfnet.cli import main
    from wfnet.run import Run

    run_dir = tmp_path / "run"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run_dir), "--image-size", "8", "--epochs", "2", "--train-limit", "300",
                 "--test-limit", "100", *common]) == 0
    assert main(["baselines", str(run_dir), "--methods", "ssd,random-labels", "--classes", "0,4", "--ssd-alpha", "5",
                 "--max-steps", "2", *common]) == 0
    run = Run.open(run_dir)
    assert run.baseline_classes("ssd") == [0, 4]
    metas = {c: read_state_meta(run_dir / "baselines" / "ssd" / f"class_{c}.safetensors") for c in (0, 4)}
    for c, meta in metas.items():
        assert meta["options"] == {"ssd_alpha": 5.0, "ssd_lambda": 1.0, "ssd_batch_size": 64}
        assert meta["full_samples"] > meta["forget_samples"] > 0
        assert meta["samples"] == meta["full_samples"] + meta["forget_samples"]
        assert meta["seconds"] >= meta["full_importance_seconds"] > 0 and 0 < meta["dampened_fraction"] < 1
    # computed once for both classes: the same full-data pass is in both classes' cost
    assert metas[0]["full_importance_seconds"] == metas[4]["full_importance_seconds"]
    summary = json.loads((run_dir / "baselines" / "ssd" / "summary.json").read_text())
    assert set(summary["seconds"]) == {"0", "4"}
    original, dampened = run.original_model(), run.baseline_model("ssd", 0)
    assert any(not torch.equal(a, b) for a, b in zip(original.state_dict().values(), dampened.state_dict().values()))
    # another alpha: refused without --force, and it does not concern random-labels
    assert main(["baselines", str(run_dir), "--methods", "ssd", "--classes", "0", "--ssd-alpha", "20", *common]) == 2
    assert "ssd_alpha: 5.0 -> 20.0" in capsys.readouterr().err
    assert main(["baselines", str(run_dir), "--methods", "random-labels", "--classes", "0", "--ssd-alpha", "20",
                 "--max-steps", "2", *common]) == 0
    assert main(["evaluate", str(run_dir), "--metrics", "acc", "--methods", "original,ssd", *common]) == 0
    assert "| SSD (2 classes) |" in (run_dir / "eval" / "table1.md").read_text()
