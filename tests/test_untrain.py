"""Untraining: label expansion, the loss against a hand computation, recipes, resume equivalence, early stopping."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import wfnet
from wfnet import untrain as U
from wfnet.models import SmallCNN


def test_expand_batch_shapes_and_rows_never_the_label():
    g = torch.Generator().manual_seed(0)
    for num_classes, b, chi in [(2, 8, 3), (10, 128, 3), (1000, 7, 2), (5, 1, 4)]:
        x = torch.randn(b, 1, 4, 4)
        y = torch.randint(0, num_classes, (b,), generator=g)
        inputs, rows, labels, nf = U.expand_batch(x, y, num_classes, chi, g)
        n_r = b - b // 2
        assert nf == b // 2
        assert inputs.shape == (nf + chi * n_r, 1, 4, 4)
        assert rows.shape == labels.shape == (nf + chi * n_r,)
        # forget half: row = label, inputs unchanged
        assert torch.equal(rows[:nf], y[:nf]) and torch.equal(inputs[:nf], x[:nf])
        # retain half: chi copies of the same samples, every row differs from the label and is a valid class
        assert torch.equal(labels[nf:], y[nf:].repeat(chi))
        assert torch.equal(inputs[nf:], x[nf:].repeat(chi, 1, 1, 1))
        assert (rows[nf:] != labels[nf:]).all()
        assert ((rows >= 0) & (rows < num_classes)).all()


def test_expand_batch_rows_cover_all_other_classes():
    g = torch.Generator().manual_seed(1)
    y = torch.zeros(2000, dtype=torch.long)
    _, rows, _, nf = U.expand_batch(torch.zeros(2000, 1), y, 5, 3, g)
    assert set(rows[nf:].tolist()) == {1, 2, 3, 4}


def test_expand_batch_rejects_single_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        U.expand_batch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 1, 3, torch.Generator())


@pytest.mark.parametrize("forget_loss", ["mean_inverse", "inverse_mean"])
def test_loss_matches_hand_computation(forget_loss):
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    nf = 4
    params = [torch.randn(3, 5), torch.randn(3, 2)]
    cfg = U.UntrainConfig(lambda_retain=2.0, lambda_forget=3.0, lambda_reg=0.5, eps=0.01, forget_loss=forget_loss)
    loss, parts = U.untrain_loss(logits, labels, nf, params, cfg)
    # by hand: -log softmax at the label, per sample
    ce = [-(logits[i, labels[i]] - logits[i].exp().sum().log()) for i in range(10)]
    ce_f, ce_r = torch.stack(ce[:nf]), torch.stack(ce[nf:])
    if forget_loss == "mean_inverse":
        forget = sum(1.0 / (c + 0.01) for c in ce_f) / nf
    else:
        forget = 1.0 / (ce_f.sum() / nf + 0.01)
    gates = torch.cat([p.reshape(-1) for p in params])
    reg = sum(1 - 1 / (1 + torch.exp(-a)) for a in gates) / gates.numel()
    expected = 2.0 * ce_r.sum() / len(ce_r) + 3.0 * forget + 0.5 * reg
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["retain_ce"] == pytest.approx((ce_r.sum() / len(ce_r)).item(), rel=1e-5)
    assert parts["reg"] == pytest.approx(reg.item(), rel=1e-5)


def test_recipes():
    paper = U.recipe("paper", "cnn")
    assert (paper.optimizer, paper.lr, paper.lambda_retain, paper.lambda_forget, paper.lambda_reg) == \
        ("sgd", 100.0, 1.0, 10.0, 1.0)
    assert (paper.chi, paper.batch_size, paper.init, paper.patience, paper.val_per_epoch) == (3, 128, 3.0, 10, 5)
    assert U.recipe("paper", "vit").lambda_forget == 100.0
    tuned = U.recipe("tuned", "cnn", lr=0.5, chi=None)
    assert tuned.optimizer == "adam" and tuned.lr == 0.5 and tuned.chi == 3
    with pytest.raises(ValueError, match="unknown recipe"):
        U.recipe("nope")
    with pytest.raises(ValueError, match="unknown untraining option"):
        U.recipe("tuned", "cnn", learning_rate=1)


def _tiny_problem(n=96, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # class-dependent blobs so the model learns something quickly
    y = torch.arange(n) % num_classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(num_classes):
        x[y == c, :, c * 2:(c + 1) * 2, :] += 2.0
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, 1, widths=(4, 6, 8)).eval()
    return TensorDataset(x, y), model


def _gates(wf):
    return {k: p.detach().clone() for k, p in wf.named_filter_parameters()}


def test_untrain_changes_only_gates_and_is_repeatable():
    ds, model = _tiny_problem()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=2, val_per_epoch=2)
    runs = []
    for _ in range(2):
        wf = wfnet.wrap(copy.deepcopy(model), 4)
        summary = U.untrain(wf, ds, ds, cfg, torch.device("cpu"), progress=False)
        runs.append(_gates(wf))
        for k, v in wf.model.state_dict().items():
            if "alpha" not in k:
                assert torch.equal(v, frozen[k]), k  # weights and BatchNorm statistics untouched
    assert summary["steps"] == 2 * 6 and len(summary["history"]) == 2 * 2
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])
        assert not torch.equal(runs[0][k], torch.full_like(runs[0][k], 3.0))  # the gates moved
        assert runs[0][k].abs().max() <= 6.0  # clamped


def test_resume_gives_the_same_result(tmp_path, monkeypatch):
    ds, model = _tiny_problem()
    cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=2, val_per_epoch=3)
    wf_full = wfnet.wrap(copy.deepcopy(model), 4)
    U.untrain(wf_full, ds, ds, cfg, torch.device("cpu"), state_path=tmp_path / "a.safetensors", progress=False)

    real_save = U.save_state
    calls = {"n": 0}

    def killed_after_third(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(U, "save_state", killed_after_third)
    wf_a = wfnet.wrap(copy.deepcopy(model), 4)
    with pytest.raises(KeyboardInterrupt):
        U.untrain(wf_a, ds, ds, cfg, torch.device("cpu"), state_path=tmp_path / "b.safetensors", progress=False)
    monkeypatch.setattr(U, "save_state", real_save)
    wf_b = wfnet.wrap(copy.deepcopy(model), 4)  # a new process: fresh model, state from disk
    U.untrain(wf_b, ds, ds, cfg, torch.device("cpu"), state_path=tmp_path / "b.safetensors", resume=True,
              progress=False)
    full, resumed = _gates(wf_full), _gates(wf_b)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)


def test_resume_refuses_a_different_config(tmp_path):
    ds, model = _tiny_problem()
    cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=1, val_per_epoch=1)
    U.untrain(wfnet.wrap(copy.deepcopy(model), 4), ds, ds, cfg, torch.device("cpu"),
              state_path=tmp_path / "s.safetensors", progress=False)
    other = U.recipe("tuned", "cnn", batch_size=16, max_epochs=1, val_per_epoch=1, lr=0.3)
    with pytest.raises(ValueError, match="different untraining config"):
        U.untrain(wfnet.wrap(copy.deepcopy(model), 4), ds, ds, other, torch.device("cpu"),
                  state_path=tmp_path / "s.safetensors", resume=True, progress=False)


def test_early_stopping_and_best_gates_restored():
    ds, model = _tiny_problem()
    # lr 0 with SGD: the validation loss never improves after the first validation -> stop after `patience` more
    cfg = U.recipe("paper", "cnn", lr=0.0, batch_size=16, max_epochs=50, val_per_epoch=2, patience=3)
    wf = wfnet.wrap(copy.deepcopy(model), 4)
    summary = U.untrain(wf, ds, ds, cfg, torch.device("cpu"), progress=False)
    assert summary["stopped"].startswith("early stopping")
    assert len(summary["history"]) == 4
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in wf.filter_parameters())


def test_untraining_forgets_on_a_separable_problem():
    ds, model = _tiny_problem(n=160)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = ds.tensors
    model.train()
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    wf = wfnet.wrap(model, 4)
    U.untrain(wf, ds, ds, U.recipe("tuned", "cnn", batch_size=32, max_epochs=30), torch.device("cpu"),
              progress=False)
    with torch.no_grad():
        for c in range(4):
            pred = wf(x, forget=c).argmax(1)
            assert (pred[y == c] == c).float().mean() < 0.2  # class c forgotten with row c
        assert (wf(x).argmax(1) == y).float().mean() > 0.95  # no row: the original model
