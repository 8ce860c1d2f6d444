"""Tests of wfnet.metrics: known answers (ZRF, relearn time, insertion/deletion) and that no metric modifies a model."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import wfnet
from wfnet import metrics as M


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------------- ZRF / JS


def test_zrf_one_hot_vs_uniform_is_0_4744():
    p = torch.zeros(4, 10)
    p[:, 3] = 1.0
    q = torch.full((4, 10), 0.1)
    assert round(M.zrf(p, q), 4) == 0.4744


def test_zrf_identical_distributions_and_models_is_one():
    p = torch.softmax(torch.randn(16, 10), 1)
    assert M.zrf(p, p) == pytest.approx(1.0, abs=1e-12)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 4), torch.zeros(20, dtype=torch.long)), batch_size=6)
    assert M.zrf_score(net, net, loader) == pytest.approx(1.0, abs=1e-12)
    assert M.zrf_bad_teaching_score(net, net, loader) == pytest.approx(1.0, abs=1e-12)


def test_js_divergence_is_textbook():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(8, 7), 1), torch.softmax(torch.randn(8, 7), 1)
    js = M.js_divergence(p, q)
    m = (p + q) / 2
    ref = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    torch.testing.assert_close(js, ref.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(js, M.js_divergence(q, p))  # symmetric
    # disjoint supports reach the maximum, ln 2 (zeros handled: 0 log 0 = 0)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(M.js_divergence(a, b)) == pytest.approx(math.log(2))
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    assert float(js[0]) == pytest.approx(scipy_distance.jensenshannon(p[0].numpy(), q[0].numpy()) ** 2, rel=1e-5)


def test_zrf_bad_teaching_matches_reference_code_and_differs_from_textbook():
    torch.manual_seed(1)
    logits, rlogits = torch.randn(12, 10) * 3, torch.randn(12, 10)
    p, q = torch.softmax(logits, 1), torch.softmax(rlogits, 1)
    m = (p + q) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F.kl_div's deprecated "mean" reduction, as the reference code uses it
        ref = 1 - (0.5 * F.kl_div(torch.log(p), m) + 0.5 * F.kl_div(torch.log(q), m))
    assert M.zrf_bad_teaching(p, q) == pytest.approx(float(ref), abs=1e-6)
    assert M.bad_teaching_from_logits(logits, rlogits) == pytest.approx(float(ref), abs=1e-6)
    assert abs(M.zrf_bad_teaching(p, q) - M.zrf(p, q)) > 0.05


def test_zrf_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        M.zrf(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)


# --------------------------------------------------------------------------------------------------- accuracy


class LabelEcho(nn.Module):
    """A 'model' whose input carries the label in feature 0; it predicts that label, or ``swap`` for class c."""

    def __init__(self, k, forget=None):
        super().__init__()
        self.k, self.forget = k, forget
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = x[:, 0].long()
        if self.forget is not None:
            y = torch.where(y == self.forget, (y + 1) % self.k, y)
        return F.one_hot(y, self.k).float() * 5


def _label_loader(labels, batch_size=7):
    labels = torch.as_tensor(labels)
    return DataLoader(TensorDataset(labels.float()[:, None].repeat(1, 3), labels), batch_size=batch_size)


def test_predict_concatenates_batches():
    loader = _label_loader([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
    logits, labels = M.predict(LabelEcho(3), loader)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32 and labels.tolist()[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="pairs"):
        M.predict(LabelEcho(3), [torch.zeros(2, 3)])


def test_accuracy_forget_retain_known_values():
    labels = [0, 1, 2, 3] * 5 + [0, 0]
    loader = _label_loader(labels)
    res = M.accuracy_forget_retain(lambda c: LabelEcho(4, forget=c), loader, classes=range(4))
    for c in range(4):
        assert res["per_class"][c]["acc_f"] == 0.0 and res["per_class"][c]["acc_r"] == 100.0
    assert res["per_class"][0]["n_f"] == 7 and res["per_class"][0]["n_r"] == 15
    assert res["acc_f"] == 0.0 and res["acc_r"] == 100.0
    shared = M.accuracy_forget_retain_shared(LabelEcho(4), loader, classes=range(4))
    assert shared["acc_f"] == 100.0 and shared["acc_r"] == 100.0
    # a forget model wrong on half of class 1 only: exact percentages
    pred = torch.tensor([0, 1, 2, 2])
    r = M.forget_retain_from_predictions(pred, torch.tensor([0, 1, 1, 2]), 1)
    assert r["acc_f"] == 50.0 and r["acc_r"] == 100.0


def test_accuracy_and_labels_helpers():
    labels = [0, 1, 2, 3] * 5
    loader = _label_loader(labels)
    assert M.accuracy(LabelEcho(4), loader) == 100.0
    assert M.accuracy(LabelEcho(4, forget=1), loader) == 75.0  # class 1 (5 of 20 samples) always wrong
    ds = loader.dataset
    assert M.labels_of(ds).tolist() == labels
    assert M.labels_of(torch.utils.data.Subset(ds, [3, 1])).tolist() == [3, 1]

    class Plain(torch.utils.data.Dataset):  # no tensors, no targets: read through a loader
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2), 2 - i

    assert M.labels_of(Plain()).tolist() == [2, 1, 0]


def test_zrf_from_logits_is_zrf_of_the_softmaxes():
    torch.manual_seed(2)
    logits, rlogits = torch.randn(9, 5) * 4, torch.randn(9, 5)
    assert M.zrf_from_logits(logits, rlogits) == pytest.approx(
        M.zrf(torch.softmax(logits.double(), 1), torch.softmax(rlogits.double(), 1)), abs=1e-12)


def test_accuracy_absent_class_is_nan_and_left_out_of_mean():
    loader = _label_loader([0, 1, 0, 1])
    res = M.accuracy_forget_retain_shared(LabelEcho(3), loader, classes=range(3))
    assert math.isnan(res["per_class"][2]["acc_f"]) and res["acc_f"] == 100.0


# --------------------------------------------------------------------------------------------------- relearn time


def _blobs(n_per_class=20, k=3, seed=0):
    """Linearly separable data: class j has a bright feature j."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 6, generator=g) * 0.3
    x[torch.arange(len(y)), y] += 3.0
    return TensorDataset(x, y)


def _linear_trained(k=3):
    net = nn.Linear(6, k)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[torch.arange(k), torch.arange(k)] = 2.0
        net.bias.zero_()
    return net


def test_relearn_time_zero_when_class_is_known_and_model_untouched():
    data = _blobs()
    net = _linear_trained()
    net.requires_grad_(False)
    state = _state(net)
    loader = DataLoader(M.class_subset(data, 1), batch_size=16)
    res = M.relearn_time(net, data, loader, target_acc=100.0, max_epochs=5, samples_per_epoch=30)
    assert res.epochs == 0 and res.accuracies == [100.0]
    assert _same_state(net, state) and not any(p.requires_grad for p in net.parameters())


def test_relearn_time_counts_epochs_until_target_and_is_deterministic():
    data = _blobs()
    net = _linear_trained()
    with torch.no_grad():  # "unlearned" class 1: its logit is pushed far down
        net.weight[1].zero_()
        net.bias[1] = -4.0
    state = _state(net)
    loader = DataLoader(M.class_subset(data, 1), batch_size=16)
    kw = dict(max_epochs=50, samples_per_epoch=30, lr=0.5, batch_size=10, seed=3)
    res = M.relearn_time(net, data, loader, target_acc=100.0, **kw)
    assert res.epochs is not None and res.epochs >= 1
    assert len(res.accuracies) == res.epochs + 1
    assert res.accuracies[-1] >= 100.0 and all(a < 100.0 for a in res.accuracies[:-1])
    assert _same_state(net, state)
    again = M.relearn_time(net, data, loader, target_acc=100.0, **kw)
    assert again.epochs == res.epochs and again.accuracies == res.accuracies


def test_relearn_time_never_within_cap():
    data = _blobs()
    net = _linear_trained()
    with torch.no_grad():
        net.weight[1].zero_()
        net.bias[1] = -50.0
    loader = DataLoader(M.class_subset(data, 1), batch_size=16)
    res = M.relearn_time(net, data, loader, target_acc=100.0, max_epochs=2, samples_per_epoch=10, lr=1e-4)
    assert res.epochs is None and len(res.accuracies) == 3


def test_relearn_time_on_wfmodel_keeps_gates_and_leaves_model_unchanged():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 6, 6), torch.arange(3).repeat(8))
    inner = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    wf = wfnet.wrap(inner, num_classes=3)
    wf.eval()
    state = _state(wf)
    grads = {n: p.requires_grad for n, p in wf.named_parameters()}
    loader = DataLoader(M.class_subset(data, 0), batch_size=8)
    res = M.relearn_time(wf, data, loader, target_acc=101.0, forget=0, max_epochs=2, samples_per_epoch=8,
                         batch_size=4)
    assert res.epochs is None and len(res.accuracies) == 3
    assert _same_state(wf, state) and grads == {n: p.requires_grad for n, p in wf.named_parameters()}
    assert not wf.training
    with pytest.raises(ValueError, match="forget=c"):
        M.relearn_time(wf, data, loader, target_acc=50.0)
    with pytest.raises(ValueError, match="only to a WFModel"):
        M.relearn_time(inner, data, loader, target_acc=50.0, forget=0)


def test_summarize_relearn_counts_never_as_cap():
    s = M.summarize_relearn([1, None, 4], max_epochs=100)
    assert s["mean"] == pytest.approx(35.0) and s["never"] == 1 and s["display"] == "35.0 (1)"
    assert M.summarize_relearn([None] * 10, 100)["display"] == ">100 (10)"
    assert M.summarize_relearn([0, 0], 100)["display"] == "0.0 (0)"


# --------------------------------------------------------------------------------------------------- ins / del


def _one_channel_model():
    """Class 0's logit depends on channel 0 (strongly) and channel 1 (weakly); channels 2, 3 feed nothing."""
    inner = nn.Sequential(nn.Conv2d(1, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        inner[0].weight.fill_(1.0)
        inner[0].bias.zero_()
        inner[3].weight.zero_()
        inner[3].weight[0, 0] = 4.0
        inner[3].weight[0, 1] = 1.0
    wf = wfnet.wrap(inner, num_classes=3)
    with torch.no_grad():
        alpha = wf.filtered_layers()["0"].alpha_weight
        alpha[0] = torch.tensor([-4.0, -2.0, 3.0, 3.5])  # relevance order for class 0: 0, 1, 2, 3
    return wf.eval()


def _class0_loader():
    x = torch.rand(12, 1, 3, 3) + 0.5
    return DataLoader(TensorDataset(x, torch.zeros(12, dtype=torch.long)), batch_size=5)


def test_channel_ranking_lowest_gate_first():
    wf = _one_channel_model()
    assert M.channel_ranking(wf, 0)["0"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        M.channel_ranking(wf, 3)


def test_deletion_monotone_when_class_depends_on_one_channel():
    wf = _one_channel_model()
    state = _state(wf)
    res = M.insertion_deletion(wf, 0, _class0_loader(), steps=[0, 0.25, 0.5, 0.75, 1.0])
    dele, ins = torch.tensor(res["deletion"]["curve"]), torch.tensor(res["insertion"]["curve"])
    assert dele[0] == pytest.approx(1.0, abs=1e-6)  # nothing closed = the original model
    assert bool((dele.diff() <= 1e-9).all()) and dele[1] < 0.9 and dele[2] < dele[1]
    assert ins[-1] == pytest.approx(1.0, abs=1e-6)  # everything re-opened = the original model
    assert ins[0] < 0.9 and ins[1] > ins[0]  # re-opening channel 0 first restores most of the confidence
    assert res["insertion"]["auc"] > res["deletion"]["auc"]
    assert _same_state(wf, state)  # the gate overrides never touch the stored parameters
    # a reversed relevance order closes the useless channels first: a higher (worse) deletion score
    with torch.no_grad():
        wf.filtered_layers()["0"].alpha_weight[0] = torch.tensor([3.5, 3.0, -2.0, -4.0])
    worse = M.gate_curve(wf, 0, _class0_loader(), "deletion", steps=[0, 0.25, 0.5, 0.75, 1.0])
    assert worse["auc"] > res["deletion"]["auc"]


def test_insertion_flat_at_one_when_gates_close_nothing():
    wf = _one_channel_model()
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.fill_(M.GATE_OPEN)
    wf.train()
    res = M.gate_curve(wf, 0, _class0_loader(), "insertion", steps=11)
    assert len(res["curve"]) == 11
    curve = torch.tensor(res["curve"], dtype=torch.float64)
    torch.testing.assert_close(curve, torch.ones(11, dtype=torch.float64), atol=1e-6, rtol=0)
    assert res["auc"] == pytest.approx(1.0, abs=1e-6)
    assert wf.training  # the temporary eval mode is undone


def test_gate_steps_validation():
    assert M.gate_steps(21).tolist()[:3] == pytest.approx([0.0, 0.05, 0.1])
    for bad in (1, [0.0, 0.5], [0.1, 1.0], [0.0, 0.6, 0.4, 1.0]):
        with pytest.raises(ValueError):
            M.gate_steps(bad)
    with pytest.raises(ValueError, match="mode"):
        M.gate_curve(_one_channel_model(), 0, _class0_loader(), "both")
