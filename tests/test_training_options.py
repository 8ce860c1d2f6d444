"""The training / untraining / baseline options the reproduce profiles use: random-shift augmentation, the one-cycle
schedule and AdamW, bf16 autocast, ViT patch size and ResNet stem stride, VGG-16-BN, step caps, and run folders made
before an option existed."""
import copy
import json

import pytest
import torch

import wfnet
import wfnet.train as T
from wfnet import Run, RunError
from wfnet import untrain as U
from wfnet.baselines import unlearn_baseline
from wfnet.baselines import BaselineConfig
from wfnet.config import DataConfig, with_defaults
from wfnet.train import TrainConfig
from wfnet.models import SmallCNN, build_model
from test_untrain import _tiny_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_shift_translates_each_image_within_the_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(16 * 2 * 6 * 6, dtype=torch.float32).view(16, 2, 6, 6) + 1.0
    out = T.random_shift(x, 2, g)
    assert out.shape == x.shape
    bg = float(x.min())
    for i in range(16):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.full_like(x[i], bg)
                ys, yd = (slice(dy, None), slice(0, 6 - dy)) if dy >= 0 else (slice(0, 6 + dy), slice(-dy, None))
                xs, xd = (slice(dx, None), slice(0, 6 - dx)) if dx >= 0 else (slice(0, 6 + dx), slice(-dx, None))
                ref[:, yd, xd] = x[i][:, ys, xs]
                found |= torch.equal(out[i], ref)
        assert found, f"image {i} is not a translation by at most 2 px"
    assert not all(torch.equal(out[i], x[i]) for i in range(16))  # something moved
    assert torch.equal(T.random_shift(x, 0, g), x)
    again = T.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # seeded: resumable


def _tiny(n=128):
    """The class-dependent blob problem of test_untrain (4 classes, 8x8 grey images)."""
    return _tiny_problem(n)[0]


@pytest.mark.parametrize("optimizer,amp", [("sgd", "bf16"), ("adamw", "off")])
def test_onecycle_training_learns_and_resumes_to_the_same_weights(tmp_path, monkeypatch, optimizer, amp):
    ds = _tiny()
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-2,
                      schedule="onecycle", warmup=0.3, shift=1, amp=amp)
    torch.manual_seed(0)
    model = SmallCNN(4, 1, widths=(4, 6, 8))
    start = copy.deepcopy(model.state_dict())
    full = T.train_classifier(model, ds, ds, cfg, torch.device("cpu"), checkpoint=tmp_path / "a.safetensors",
                              progress=False)
    assert full["test_acc"] > 50.0  # chance is 25 %
    assert full["history"][-1]["train_loss"] < full["history"][0]["train_loss"]

    real_save = T.save_state
    calls = {"n": 0}

    def killed_after_first_epoch(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt("killed")

    resumed = SmallCNN(4, 1, widths=(4, 6, 8))
    resumed.load_state_dict(start)
    monkeypatch.setattr(T, "save_state", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        T.train_classifier(resumed, ds, ds, cfg, torch.device("cpu"), checkpoint=tmp_path / "b.safetensors",
                           progress=False)
    monkeypatch.setattr(T, "save_state", real_save)
    resumed.load_state_dict(start)  # the resumed run starts from the checkpoint, not from these weights
    T.train_classifier(resumed, ds, ds, cfg, torch.device("cpu"), checkpoint=tmp_path / "b.safetensors",
                       resume=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_unknown_training_options_fail_before_any_work():
    ds = _tiny(32)
    model = SmallCNN(4, 1, widths=(4, 6, 8))
    for bad, match in ((dict(schedule="step"), "unknown schedule"), (dict(amp="fp8"), "unknown amp"),
                       (dict(optimizer="lion"), "unknown optimizer"),
                       (dict(schedule="onecycle", warmup=1.5), "warmup")):
        with pytest.raises(ValueError, match=match):
            T.train_classifier(model, ds, ds, TrainConfig(epochs=1, **bad), torch.device("cpu"), progress=False)


def test_patch_size_stem_stride_and_vgg16_bn():
    vit = build_model("vit_tiny", 10, 1, 28, patch_size=7)
    assert vit.patch_embed.num_patches == 16
    assert build_model("vit_tiny", 10, 1, 28).patch_embed.num_patches == 49  # the default at 28 px: patch 4
    r = build_model("resnet18", 10, 1, 28, stem_stride=2).eval()
    feats = {}
    r.layer1.register_forward_hook(lambda m, i, o: feats.update(l1=o.shape))  # returns None: output unchanged
    r(torch.randn(1, 1, 28, 28))
    assert feats["l1"][-1] == 14
    vgg = build_model("vgg16_bn", 10, 1, 32)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 13
    assert vgg.features[0].in_channels == 1 and len(wfnet.wrap(vgg, 10).layer_names) == 13
    for kwargs, match in ((dict(name="resnet18", patch_size=7), "vision transformers"),
                          (dict(name="vit_tiny", stem_stride=2), "stem_stride applies to resnet18"),
                          (dict(name="resnet18", stem_stride=3), "1 or 2"),
                          (dict(name="vit_tiny", patch_size=5), "must divide")):
        name = kwargs.pop("name")
        with pytest.raises(ValueError, match=match):
            build_model(name, 10, 1, 28, **kwargs)


def test_untraining_stops_at_max_steps_after_validating_and_runs_under_bf16():
    ds = _tiny()
    torch.manual_seed(0)
    wf = wfnet.wrap(SmallCNN(4, 1, widths=(4, 6, 8)).eval(), 4)
    cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=3, max_steps=5, val_per_epoch=2, amp="bf16")
    summary = U.untrain(wf, ds, ds, cfg, torch.device("cpu"), progress=False)
    assert summary["steps"] == 5 and summary["stopped"] == "reached max_steps=5"
    assert summary["history"][-1]["step"] == 5  # the last step was validated
    assert all(p.dtype == torch.float32 for p in wf.filter_parameters())
    assert all(not torch.equal(p, torch.full_like(p, 3.0)) for p in wf.filter_parameters())
    with pytest.raises(ValueError, match="max_steps"):
        U.untrain(wf, ds, ds, U.recipe("tuned", "cnn", max_steps=0), torch.device("cpu"), progress=False)


def test_vit_tuned_recipe_uses_the_paper_forget_weight():
    vit = U.recipe("tuned", "vit")
    assert (vit.lambda_retain, vit.lambda_forget, vit.optimizer) == (200.0, 100.0, "adam")
    assert U.recipe("tuned", "cnn").lambda_forget == 10.0


@pytest.mark.parametrize("method", ["random-labels", "negative-gradients"])
def test_baseline_steps_are_capped(monkeypatch, method):
    ds = _tiny(256)
    bundle = type("B", (), {"train": ds, "val": ds, "test": ds, "num_classes": 4})()
    torch.manual_seed(0)
    model = SmallCNN(4, 1, widths=(4, 6, 8)).eval()
    steps = {"n": 0}
    real_step = torch.optim.SGD.step

    def counting(self, *a, **k):
        steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    monkeypatch.setattr("wfnet.baselines.accuracy", lambda *a, **k: 50.0)  # negative gradients: never "done" early
    unlearn_baseline(method, model, bundle, 0, BaselineConfig(batch_size=16, epochs=3, max_steps=4), "cpu",
                     progress=False)
    assert steps["n"] == 4


def test_run_folders_made_before_an_option_existed_still_match(tmp_path):
    out = tmp_path / "r"
    data, train = DataConfig(image_size=8, train_limit=200, test_limit=60), TrainConfig(epochs=1, batch_size=64)
    T.run(Run.create(out, data, log=False), train, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    for k in ("schedule", "warmup", "shift", "amp"):  # as an older wfnet wrote it
        del cfg["train"][k]
    for k in ("patch_size", "stem_stride"):
        del cfg[k]
    (out / "config.json").write_text(json.dumps(cfg))
    run = T.run(Run.create(out, data, log=False), train, progress=False)  # the same run: nothing to do, no refusal
    assert run.original_info()["test_acc"] >= 0
    with pytest.raises(RunError, match="train.shift"):
        T.run(Run.create(out, data, log=False), TrainConfig(epochs=1, batch_size=64, shift=2), progress=False)
    assert with_defaults(BaselineConfig, {"lr": 0.1})["max_steps"] is None


def test_feature_forget_term_pulls_forget_features_toward_retain_ones():
    g = torch.Generator().manual_seed(0)
    retain = torch.randn(1, 5).repeat(6, 1)
    same = torch.cat([retain[:2], retain]).requires_grad_(True)
    assert U.feature_forget_term(same, 2, g).item() == 0.0
    far = torch.cat([retain[:2] + 3.0, retain]).requires_grad_(True)
    term = U.feature_forget_term(far, 2, g)
    assert term.item() == pytest.approx((2 * 9 * 5 / 2) / retain.pow(2).sum(1).mean().item(), rel=1e-5)
    term.backward()
    assert far.grad[:2].abs().sum() > 0 and far.grad[2:].abs().sum() == 0  # retain features are the target only


def test_untraining_with_the_feature_term_records_it_and_moves_other_gates():
    ds = _tiny()
    gates = []
    for lam in (0.0, 5.0):
        torch.manual_seed(0)
        wf = wfnet.wrap(SmallCNN(4, 1, widths=(4, 6, 8)).eval(), 4)
        cfg = U.recipe("tuned", "cnn", batch_size=16, max_epochs=1, val_per_epoch=2, lambda_feature=lam)
        summary = U.untrain(wf, ds, ds, cfg, torch.device("cpu"), progress=False)
        last = summary["history"][-1]
        assert ("feature_term" in last["train"] and "feature_term" in last["val"]) == (lam > 0)
        gates.append(torch.cat([p.detach().flatten() for p in wf.filter_parameters()]))
    assert not torch.equal(gates[0], gates[1])


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path):
    """``compile=True`` runs the same steps through torch.compile: the trained weights match eager training (up to
    float rounding) and the checkpoint keys are the plain model's (no ``_orig_mod.`` prefix)."""
    ds = _tiny(64)
    results = {}
    for comp in (False, True):
        torch.manual_seed(0)
        model = SmallCNN(4, 1, widths=(4, 6, 8))
        # SGD: Adam's normalised update would turn rounding in near-zero gradients into lr-sized differences
        cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=1e-2, compile=comp)
        T.train_classifier(model, ds, ds, cfg, torch.device("cpu"), checkpoint=tmp_path / f"{comp}.safetensors",
                           progress=False)
        results[comp] = model.state_dict()
        from wfnet.checkpoint import load_state
        keys = {k for k in load_state(tmp_path / f"{comp}.safetensors")[0] if k.startswith("model.")}
        assert keys == {f"model.{k}" for k in model.state_dict()}
    for k, v in results[False].items():
        torch.testing.assert_close(results[True][k], v, rtol=1e-4, atol=1e-5, msg=k)
