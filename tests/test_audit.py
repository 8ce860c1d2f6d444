"""The audit metrics on known answers: MIA efficacy, linear-probe leakage, the k-shot relearning attack."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import wfnet
from wfnet import audit


def test_true_class_confidence_is_the_softmax_of_the_label():
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    conf = audit.true_class_confidence(logits, torch.tensor([1, 0]))
    np.testing.assert_allclose(conf, [0.5, 1 / (1 + np.exp(-10))], rtol=1e-6)


def test_mia_efficacy_known_answers():
    rng = np.random.default_rng(0)
    member = rng.uniform(0.95, 1.0, 300)      # training samples: confident
    non_member = rng.uniform(0.2, 0.6, 300)   # unseen samples: unsure
    assert audit.mia_efficacy(member, non_member, rng.uniform(0.2, 0.6, 100)) > 0.95  # looks unseen: forgotten
    assert audit.mia_efficacy(member, non_member, rng.uniform(0.95, 1.0, 100)) < 0.05  # looks trained on: remembered
    with pytest.raises(ValueError, match="no target"):
        audit.mia_efficacy(member, non_member, np.array([]))


def test_probe_accuracy_known_answers():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    separable = rng.normal(0, 0.1, (180, 4)) + np.eye(4)[y] * 3
    assert audit.probe_accuracy(separable[::2], y[::2], separable[1::2], y[1::2], 2) == 1.0
    noise = rng.normal(0, 1, (180, 4))  # features that carry no class: about chance (1/3)
    assert audit.probe_accuracy(noise[::2], y[::2], noise[1::2], y[1::2], 2) < 0.7
    with pytest.raises(ValueError, match="no test sample of class 5"):
        audit.probe_accuracy(noise, y, noise, y, 5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_penultimate_features_are_the_head_input_under_the_row():
    torch.manual_seed(0)
    wf = wfnet.wrap(_Net(), num_classes=3)
    with torch.no_grad():
        wf.model.conv.alpha_weight[1].fill_(-6.0)  # row 1 closes every channel and its bias
        wf.model.conv.alpha_bias[1].fill_(-6.0)
    head = audit.classifier_head(wf)
    assert head is wf.model.fc
    x, y = torch.randn(5, 1, 6, 6), torch.arange(5) % 3
    f0, labels = audit.penultimate_features(lambda t: wf(t), head, [(x, y)], "cpu")
    f1, _ = audit.penultimate_features(lambda t: wf(t, forget=1), head, [(x, y)], "cpu")
    assert f0.shape == (5, 8) and np.array_equal(labels, y.numpy())
    assert np.abs(f1).max() < 0.01 * np.abs(f0).max() + 1e-6  # sigmoid(-6) = 0.0025 of each channel (+ bias)


def test_relearn_fewshot_restores_a_class_only_when_it_trains_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    x = torch.randn(90, 1, 6, 6)
    y = torch.arange(90) % 3
    x[y == 2] += 2.0  # class 2 is easy to learn
    model = _Net()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, -50.0]))  # class 2 suppressed: Acc_f 0
    before = [p.clone() for p in model.parameters()]
    fwd = lambda m, t: m(t)  # noqa: E731
    acc0 = audit.relearn_fewshot(model, fwd, lambda m: [m.fc.bias], x, y, x, y, 2, steps=1, device="cpu", lr=0.0)
    assert acc0 == 0.0
    acc = audit.relearn_fewshot(model, fwd, lambda m: list(m.parameters()), x, y, x, y, 2, steps=60, device="cpu",
                                lr=0.5)
    assert acc > 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hard_export_zeroes_closed_channels_and_reports_them():
    torch.manual_seed(0)
    wf = wfnet.wrap(_Net(), num_classes=3)
    with torch.no_grad():
        wf.model.conv.alpha_weight[2] = torch.tensor([-6.0, -6.0, 3.0, 3.0, -1.0, 3.0, 0.5, 3.0])
        wf.model.conv.alpha_bias[2].fill_(3.0)
    soft = wfnet.export(wf, forget=2)
    hard = wfnet.export(wf, forget=2, hard=0.3)  # sigmoid(-1) = 0.27 < 0.3 < sigmoid(0.5) = 0.62
    removed = [0, 1, 4]
    assert hard.wfnet_export["removed"] == {"conv": [3, 8]} and hard.wfnet_export["hard"] == 0.3
    assert soft.wfnet_export["removed"] == {"conv": [0, 8]} and soft.wfnet_export["hard"] is None
    assert torch.all(hard.conv.weight[removed] == 0) and torch.all(hard.conv.bias[removed] == 0)
    kept = [i for i in range(8) if i not in removed]
    assert torch.equal(hard.conv.weight[kept], soft.conv.weight[kept])
    assert torch.equal(hard.conv.bias[kept], soft.conv.bias[kept])
    assert soft.conv.weight[0].abs().max() > 0  # soft: attenuated (0.25%), not removed
    assert wfnet.export(wf, forget=2, hard=True).wfnet_export["hard"] == wfnet.model.HARD_EXPORT_THRESHOLD
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(soft(x), wf(x, forget=2), rtol=1e-5, atol=1e-6)
    for bad in (0.0, 1.5, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            wfnet.export(wf, forget=2, hard=bad)


def test_run_audit_over_subjects_and_classes():
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    n = 120
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6) + y.view(-1, 1, 1, 1).float()
    train, val, test = (TensorDataset(x[i * 40:(i + 1) * 40], y[i * 40:(i + 1) * 40]) for i in range(3))
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(60):  # a model that knows the three classes
        loss = torch.nn.functional.cross_entropy(net(train.tensors[0]), train.tensors[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    wf = wfnet.wrap(net, num_classes=3)
    with torch.no_grad():
        for c in range(3):
            wf.model.conv.alpha_weight[c].fill_(3.0)
    subjects = [audit.AuditSubject("original", lambda c: (wf, lambda m, t: m(t)), skip={"relearn_fewshot"}),
                audit.AuditSubject("WF-Net", lambda c: (wf, lambda m, t, c=c: m(t, forget=c)))]
    res = audit.run_audit(subjects, train, val, test, [0, 2], "cpu", shots=(5,), steps=3, max_samples=30,
                          retain_steps=3, retain_samples=30)
    # the original gets the retain-only fine-tuning (the top of that metric's range), not the k-shot attack
    assert set(res["per_class"]["original"]) == {"mia", "probe", "relearn_retain"}
    assert set(res["per_class"]["WF-Net"]) == {"mia", "probe", "relearn_k5_head", "relearn_k5_full", "relearn_retain"}
    assert res["protocol"]["retain_steps"] == 3 and "Retain-only relearning" in audit.audit_markdown(res)
    with pytest.raises(ValueError, match="retain_steps >= 1"):
        audit.run_audit(subjects, train, val, test, [0], "cpu", metrics=["relearn_retain"], retain_steps=0)
    assert set(res["per_class"]["WF-Net"]["probe"]) == {0, 2}
    assert all(0.0 <= v <= 1.0 for r in res["mean"].values() for v in r.values())
    md = audit.audit_markdown(res)
    assert "| WF-Net |" in md and "MIA efficacy" in md
    # the attack trains a copy: the wrapped model's weights are untouched and still frozen
    assert not any(p.requires_grad for n, p in wf.named_parameters() if "alpha" not in n)


def test_evaluate_writes_the_audit_table_next_to_table1(tmp_path):
    """`wfnet evaluate --metrics mia,probe,relearn_fewshot,relearn_retain` on a tiny run: eval/audit.{md,json} with the reference
    rows, and the stamps of the models it measured; Tables 1 / 2 are left alone."""
    import json

    from wfnet.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--epochs", "1", "--train-limit", "300", "--test-limit", "200",
                 *common]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", *common]) == 0
    assert main(["evaluate", str(run), "--metrics", "acc", *common]) == 0
    table1 = (run / "eval" / "table1.md").read_text()
    audit_args = ["evaluate", str(run), "--metrics", "mia,probe,relearn_fewshot,relearn_retain", "--classes", "0,3",
                  "--audit-shots", "5", "--audit-steps", "2", "--audit-samples", "60", "--retain-steps", "3",
                  "--retain-samples", "50"]
    assert main([*audit_args, *common]) == 0
    res = json.loads((run / "eval" / "audit.json").read_text())
    assert set(res["mean"]) == {"original", "WF-Net (row c)", "WF-Net hard export (T=0.5)"}
    assert set(res["mean"]["WF-Net (row c)"]) == {"mia", "probe", "relearn_k5_head", "relearn_k5_full",
                                                  "relearn_retain"}
    assert set(res["mean"]["original"]) == {"mia", "probe", "relearn_retain"}
    assert res["protocol"]["retain_steps"] == 3 and res["protocol"]["retain_samples"] == 50
    assert res["classes"] == [0, 3] and res["stamps"]["wfnet"]
    md = (run / "eval" / "audit.md").read_text()
    assert "| WF-Net (row c) |" in md and "Acc_f after retain-only fine-tuning" in md
    # the retain-only budget is part of what the cached audit answers: another budget recomputes it
    assert main([*audit_args, *common]) == 0
    assert json.loads((run / "eval" / "audit.json").read_text())["per_class"] == res["per_class"]
    assert main([*audit_args[:-4], "--retain-steps", "4", "--retain-samples", "50", *common]) == 0
    assert json.loads((run / "eval" / "audit.json").read_text())["protocol"]["retain_steps"] == 4
    # an audit-only request leaves Table 1 (all classes) as it was, not rewritten for classes 0 and 3
    assert (run / "eval" / "table1.md").read_text() == table1
