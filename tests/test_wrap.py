"""Wrapping real backbones: wrapped torchvision VGG-16 / ResNet-18 and timm ViT-T / ViT-S against a per-sample
masked-weight model built independently here (deep copy of the original, weights and biases of every target layer
multiplied by row r_n's gates, sample n run alone); forget=None is the original model bit for bit; routing with
forgetting() (nesting, exceptions, two models interleaved, threads); export; target selection; freezing; train();
bad input at the model level.
"""
import copy
import functools
import threading

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import wfnet
from wfnet import WFConv2d, WFLinear, WFModel

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_gates(wf, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return wf


def masked_reference(original, wf, x, rows):
    """Per sample n: a deep copy of ``original`` with each target layer's weight / bias scaled by sigmoid of
    ``wf``'s gates for row rows[n], run on sample n alone. Uses nothing of wfnet but the gate values."""
    outs = []
    layers = wf.filtered_layers()
    m = copy.deepcopy(original)  # one copy; every sample rewrites the target weights from the original's
    for n, r in enumerate(rows.tolist()):
        with torch.no_grad():
            for name, layer in layers.items():
                target, source = m.get_submodule(name), original.get_submodule(name)
                assert type(target) in (nn.Conv2d, nn.Linear)
                gw = torch.sigmoid(layer.alpha_weight[r])
                target.weight.copy_(source.weight * gw.view((-1,) + (1,) * (source.weight.dim() - 1)))
                if source.bias is not None:
                    target.bias.copy_(source.bias * torch.sigmoid(layer.alpha_bias[r]))
            outs.append(m(x[n:n + 1]))
    return torch.cat(outs)


def make_model(name):
    """A fresh copy of the seeded backbone ``name`` in eval mode (built once per test session)."""
    return copy.deepcopy(_build(name))


@functools.lru_cache(maxsize=None)
def _build(name):
    torch.manual_seed(0)
    if name == "vgg16":
        model = torchvision.models.vgg16(num_classes=NUM_CLASSES)
    elif name == "resnet18":
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    else:
        model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, num_classes=NUM_CLASSES)
    model.eval()
    if name == "resnet18":
        # non-trivial BN statistics, so that BN-in-eval is really exercised
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


EXPECTED = {"vgg16": (13, WFConv2d), "resnet18": (20, WFConv2d), "vit_tiny_patch16_224": (12, WFLinear),
            "vit_small_patch16_224": (12, WFLinear)}


@pytest.fixture(scope="module")
def x32():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_wrapped_backbone_matches_per_sample_masked_model(name, x32):
    original = make_model(name)
    wf = randomise_gates(wfnet.wrap(copy.deepcopy(original), num_classes=NUM_CLASSES))
    count, kind = EXPECTED[name]
    layers = wf.filtered_layers()
    assert len(layers) == count and all(type(m) is kind for m in layers.values())
    if kind is WFLinear:
        assert all(n.endswith("attn.qkv") for n in layers)
    rows = torch.tensor([7, 0, 7])
    with torch.no_grad():
        out = wf(x32, forget=rows)
        ref = masked_reference(original, wf, x32, rows)
        plain = original(x32)
        assert torch.equal(wf(x32), plain)  # forget=None: the original model, bit for bit
        same_row = wf(x32, forget=3)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
    # the gates change the output, and per sample: samples 0 and 2 share a row, sample 1 does not
    assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-3 * scale)
    assert not torch.allclose(out[0], same_row[0], rtol=1e-3, atol=1e-3 * scale)
    torch.testing.assert_close(same_row, masked_reference(original, wf, x32, torch.full((3,), 3)), rtol=1e-4,
                               atol=1e-4 * scale)


def test_wrap_freezes_everything_but_the_gates():
    original = make_model("resnet18")
    wf = wfnet.wrap(copy.deepcopy(original), num_classes=NUM_CLASSES)
    trainable = {n for n, p in wf.named_parameters() if p.requires_grad}
    expected = {f"model.{n}" for n, _ in wf.named_filter_parameters()}
    assert trainable == expected and len(expected) == 20  # ResNet convs have no bias: weight gates only
    assert {id(p) for p in wf.filter_parameters()} == {id(p) for p in wf.parameters() if p.requires_grad}
    assert wf.num_filter_parameters() == sum(p.numel() for p in wf.filter_parameters())
    assert wf.num_filter_parameters() == sum(NUM_CLASSES * m.out_channels * (2 if m.bias is not None else 1)
                                             for m in original.modules() if isinstance(m, nn.Conv2d))
    # the original weights keep their state-dict keys
    orig_keys = set(original.state_dict())
    wf_keys = {k[len("model."):] for k in wf.state_dict()}
    assert orig_keys <= wf_keys and all(k.endswith(("alpha_weight", "alpha_bias")) for k in wf_keys - orig_keys)
    x = torch.randn(2, 3, 32, 32)
    wf(x, forget=torch.tensor([1, 2])).sum().backward()
    assert all(p.grad is None for n, p in wf.named_parameters() if not n.endswith(("alpha_weight", "alpha_bias")))
    assert wf.filtered_layers()["conv1"].alpha_weight.grad[[1, 2]].abs().sum() > 0


def test_train_keeps_batchnorm_in_eval():
    wf = wfnet.wrap(make_model("resnet18"), num_classes=NUM_CLASSES)
    wf.train()
    bns = [m for m in wf.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert wf.training and wf.model.training and wf.model.layer1.training
    before = bns[0].running_mean.clone()
    wf(torch.randn(2, 3, 32, 32), forget=1)
    assert torch.equal(bns[0].running_mean, before)
    wf.eval()
    assert not wf.model.training
    loose = wfnet.wrap(make_model("resnet18"), num_classes=NUM_CLASSES, freeze_norm=False).train()
    assert all(m.training for m in loose.modules() if isinstance(m, nn.BatchNorm2d))


def test_forget_none_is_bit_exact_for_vit_in_train_mode_too():
    original = make_model("vit_tiny_patch16_224")
    wf = randomise_gates(wfnet.wrap(copy.deepcopy(original), num_classes=NUM_CLASSES))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wf(x), original(x))
        wf.train()
        original.train()  # no dropout in this ViT: train mode is deterministic too
        assert torch.equal(wf(x, forget=None), original(x))
        assert not torch.equal(wf(x, forget=1), original(x))


# ---------------------------------------------------------------------------------------------------------------------
# Small CNN for the routing / bad-input tests

class SmallCNN(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def small(seed=0):
    torch.manual_seed(seed)
    original = SmallCNN().eval()
    return original, randomise_gates(wfnet.wrap(copy.deepcopy(original), num_classes=NUM_CLASSES), seed)


def test_forgetting_routes_rows_to_the_inner_model():
    original, wf = small()
    x = torch.randn(4, 3, 8, 8)
    rows = torch.tensor([3, 9, 0, 3])
    expected = wf(x, forget=rows)
    with wfnet.forgetting(wf, rows) as same:
        assert same is wf
        torch.testing.assert_close(wf.model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(wf(x), expected, rtol=0, atol=0)  # forget=None inherits the context
        torch.testing.assert_close(wf(x, forget=5), wf(x, forget=torch.full((4,), 5)), rtol=0, atol=0)
    with wfnet.forgetting(wf, 2):
        torch.testing.assert_close(wf.model(x), wf(x, forget=2), rtol=0, atol=0)
    with wfnet.forgetting(wf, [1, 2, 3, 4]):
        torch.testing.assert_close(wf.model(x), wf(x, forget=torch.tensor([1, 2, 3, 4])), rtol=0, atol=0)
    assert torch.equal(wf.model(x), original(x))
    assert not torch.allclose(expected, original(x))


def test_nested_forgetting_and_exceptions_leave_router_clean():
    original, wf = small()
    x = torch.randn(2, 3, 8, 8)
    with wfnet.forgetting(wf, 1):
        with wfnet.forgetting(wf, torch.tensor([4, 6])):
            torch.testing.assert_close(wf.model(x), wf(x, forget=torch.tensor([4, 6])), rtol=0, atol=0)
            with wfnet.forgetting(wf, None):  # explicit None inside: the original model
                assert torch.equal(wf.model(x), original(x))
        torch.testing.assert_close(wf.model(x), wf(x, forget=1), rtol=0, atol=0)
    assert not wf.router.active()
    with pytest.raises(RuntimeError, match="inside"):
        with wfnet.forgetting(wf, 3):
            wf.model(x)
            raise RuntimeError("inside")
    assert not wf.router.active()
    assert torch.equal(wf.model(x), original(x))
    # an error raised by a layer (rows of the wrong length for this input) also unwinds the router
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        wf(x, forget=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        with wfnet.forgetting(wf, torch.tensor([1, 2, 3])):
            wf.model(x)
    assert not wf.router.active()
    assert torch.equal(wf(x), original(x))


def test_two_wrapped_models_do_not_see_each_others_rows():
    orig_a, wf_a = small(0)
    orig_b, wf_b = small(1)
    x = torch.randn(2, 3, 8, 8)
    ref_a = {r: wf_a(x, forget=r) for r in (2, 7)}
    ref_b = {r: wf_b(x, forget=r) for r in (2, 7)}
    with wfnet.forgetting(wf_a, 2):
        assert torch.equal(wf_b.model(x), orig_b(x))
        with wfnet.forgetting(wf_b, 7):
            torch.testing.assert_close(wf_a.model(x), ref_a[2], rtol=0, atol=0)
            torch.testing.assert_close(wf_b.model(x), ref_b[7], rtol=0, atol=0)
            torch.testing.assert_close(wf_a(x, forget=7), ref_a[7], rtol=0, atol=0)
        torch.testing.assert_close(wf_a.model(x), ref_a[2], rtol=0, atol=0)
    # a model built from layers of both: each layer follows its own router
    combo = nn.Sequential(wf_a.model, nn.Softmax(-1))
    with wfnet.forgetting(wf_b, 7):
        assert torch.equal(combo(x), nn.Softmax(-1)(orig_a(x)))


def test_rows_are_per_thread():
    original, wf = small()
    x = torch.randn(2, 3, 8, 8)
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = wf.model(x)  # runs while the main thread holds rows 5
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with wfnet.forgetting(wf, 5):
        inside.set()
        release.wait(timeout=30)
        seen["main"] = wf.model(x)
    t.join()
    assert torch.equal(seen["other"], original(x))
    torch.testing.assert_close(seen["main"], wf(x, forget=5), rtol=0, atol=0)


def test_deepcopy_of_a_wrapped_model_keeps_its_own_router():
    _, wf = small()
    x = torch.randn(2, 3, 8, 8)
    with wfnet.forgetting(wf, 4):
        twin = copy.deepcopy(wf)
        assert not twin.router.active()
    assert all(layer._router is twin.router for layer in twin.filtered_layers().values())
    torch.testing.assert_close(twin(x, forget=4), wf(x, forget=4), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input at the model level

def test_model_and_forgetting_reject_bad_rows():
    _, wf = small()
    x = torch.randn(2, 3, 8, 8)
    for bad in (-1, NUM_CLASSES, 1000):
        for rows in (bad, torch.tensor([0, bad]), [bad, 0]):
            with pytest.raises(ValueError, match=rf"row {bad}\b.*num_classes={NUM_CLASSES}"):
                wf(x, forget=rows)
            with pytest.raises(ValueError, match=rf"row {bad}\b.*num_classes={NUM_CLASSES}"):
                with wfnet.forgetting(wf, rows):
                    pass
    for rows in (torch.tensor([0.0, 1.0]), torch.tensor([True, False]), 1.5, True):
        with pytest.raises(TypeError):
            wf(x, forget=rows)
        with pytest.raises(TypeError):
            with wfnet.forgetting(wf, rows):
                pass
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        wf(x, forget=torch.tensor([1]))
    with pytest.raises(ValueError, match="1-d"):
        with wfnet.forgetting(wf, torch.zeros(2, 2, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="WFModel"):
        with wfnet.forgetting(wf.model, 1):
            pass
    assert not wf.router.active()


def test_model_input_on_another_device():
    _, wf = small()
    with pytest.raises(ValueError, match="meta"):
        wf(torch.randn(2, 3, 8, 8, device="meta"), forget=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="meta"):
        with wfnet.forgetting(wf, 1):
            wf.model(torch.randn(2, 3, 8, 8, device="meta"))
    assert not wf.router.active()


def test_model_empty_batch():
    original, wf = small()
    x = torch.randn(0, 3, 8, 8)
    for rows in (torch.zeros(0, dtype=torch.long), 3):
        out = wf(x, forget=rows)
        assert out.shape == (0, NUM_CLASSES)
    assert wf(x).shape == original(x).shape == (0, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# Target selection

def test_targets_names_globs_and_predicate():
    def wrapped(targets):
        return wfnet.wrap(SmallCNN(4), num_classes=4, targets=targets)

    assert wrapped("auto").layer_names == ["features.0", "features.3"]
    assert wrapped(["features.3"]).layer_names == ["features.3"]
    assert wrapped("head").layer_names == ["head"] and isinstance(wrapped("head").model.head, WFLinear)
    # a glob spans a block holding norms and activations: it picks its conv / linear layers only
    assert wrapped(["features.*"]).layer_names == ["features.0", "features.3"]
    assert wrapped(["features.[3-9]", "he*"]).layer_names == ["features.3", "head"]
    pred = wrapped(lambda name, m: isinstance(m, nn.Conv2d) and m.groups > 1)
    assert pred.layer_names == ["features.3"]
    assert wfnet.find_targets(SmallCNN(), lambda n, m: isinstance(m, nn.Linear)).names == ["head"]
    with pytest.raises(TypeError, match=r"features\.1 \(BatchNorm2d\)"):
        wrapped(["features.1"])
    with pytest.raises(ValueError, match="match no module"):
        wrapped(["features.0", "nonexistent"])
    with pytest.raises(ValueError, match="match no module"):
        wrapped(["*.bn*"])


def test_model_with_nothing_to_wrap_raises():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no layer to filter"):
        wfnet.wrap(mlp, num_classes=3)
    assert all(p.requires_grad for p in mlp.parameters())  # left untouched
    with pytest.raises(ValueError, match="no layer to filter"):
        wfnet.wrap(SmallCNN(3), num_classes=3, targets=lambda n, m: False)
    _, wf = small()
    with pytest.raises(TypeError, match="already wrapped"):
        wfnet.wrap(wf, num_classes=3)


def test_auto_on_a_vit_filters_only_qkv():
    wf = wfnet.wrap(make_model("vit_tiny_patch16_224"), num_classes=NUM_CLASSES)
    assert wf.layer_names == [f"blocks.{i}.attn.qkv" for i in range(12)]
    assert type(wf.model.patch_embed.proj) is nn.Conv2d and type(wf.model.head) is nn.Linear
    assert type(wf.model.blocks[0].mlp.fc1) is nn.Linear


# ---------------------------------------------------------------------------------------------------------------------
# export

def _no_wf_layers(model):
    return not any(isinstance(m, (WFConv2d, WFLinear)) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_export_gives_a_plain_model_with_the_rows_outputs(name, x32):
    original = make_model(name)
    wf = randomise_gates(wfnet.wrap(copy.deepcopy(original), num_classes=NUM_CLASSES))
    for c in (0, 6):
        plain = wfnet.export(wf, forget=c)
        assert _no_wf_layers(plain) and not isinstance(plain, WFModel)
        assert set(plain.state_dict()) == set(original.state_dict())
        assert not any(p.requires_grad for p in plain.parameters())
        with torch.no_grad():
            ref = wf(x32, forget=c)
            out = plain(x32)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not _no_wf_layers(wf.model)  # the wrapped model itself is untouched
    with pytest.raises(ValueError, match=rf"row {NUM_CLASSES}\b.*num_classes={NUM_CLASSES}"):
        wfnet.export(wf, forget=NUM_CLASSES)
    with pytest.raises(TypeError, match="WFModel"):
        wfnet.export(original, forget=0)


def test_export_keeps_conv_options():
    model = nn.Sequential(nn.Conv2d(3, 6, 4, padding="same", padding_mode="reflect"),
                          nn.Conv2d(6, 6, 3, stride=2, dilation=2, groups=3, bias=False))
    wf = randomise_gates(wfnet.wrap(model, num_classes=3))
    x = torch.randn(2, 3, 11, 11)
    plain = wfnet.export(wf, forget=1)
    assert _no_wf_layers(plain)
    torch.testing.assert_close(plain(x), wf(x, forget=1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Never silently: coverage guard, gradient probe, refusals, folded batches, nn.MultiheadAttention, the plan

class BypassAttention(nn.Module):
    """An attention class no adapter knows that computes its qkv with F.linear on its qkv module's weight."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v))


class Tokens(nn.Module):
    def __init__(self, attn, dim=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = attn
        self.aux = nn.Conv2d(dim, dim, 1)  # runs only in training (an auxiliary head)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        if self.training:
            t = t + self.aux(t.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.head(t.mean(1))


def test_guard_raises_when_a_filtered_layer_never_runs():
    wf = wfnet.wrap(Tokens(BypassAttention()).eval(), NUM_CLASSES)
    assert wf.layer_names == ["attn.qkv", "aux"]  # the generic adapter found qkv; aux is a conv of a hybrid
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(wfnet.CoverageError, match=r"attn\.qkv.*parent .*BypassAttention.*F\.linear"):
        wf(x, forget=1)
    with pytest.raises(wfnet.CoverageError, match="BypassAttention"):
        with wfnet.forgetting(wf, 1):
            wf.model(x)
    assert not wf.router.active()
    assert wf(x).shape == (2, NUM_CLASSES)  # forget=None is the original model: nothing to check


def test_allow_unused_is_the_documented_opt_out():
    model = Tokens(SmallAttention()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(wfnet.CoverageError, match=r"\baux\b"):
        wfnet.wrap(copy.deepcopy(model), NUM_CLASSES)(x, forget=1)  # eval mode skips the auxiliary conv
    wf = wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, allow_unused=["au*"])
    wf(x, forget=1)
    wf.check_gradient_coverage(x, torch.tensor([1, 2]))  # the allowed layer is not probed either
    wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, allow_unused=True)(x, forget=1)
    with pytest.raises(ValueError, match="match no filtered layer"):
        wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, allow_unused=["nothing*"])


class SmallAttention(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_gradient_probe_refuses_layers_whose_output_does_not_reach_the_loss():
    class Detached(SmallAttention):
        def forward(self, x):
            q, k, v = self.qkv(x).detach().chunk(3, -1)
            return nn.functional.scaled_dot_product_attention(q, k, v)

    wf = wfnet.wrap(Tokens(Detached()).eval(), NUM_CLASSES, allow_unused=["aux"])
    x = torch.randn(2, 3, 8, 8)
    wf(x, forget=1)  # it runs, so the forward guard passes
    with pytest.raises(wfnet.CoverageError, match=r"no gate gradient.*attn\.qkv \(parent .*Detached"):
        wf.check_gradient_coverage(x, torch.tensor([1, 2]))
    data = [(x[i], i) for i in range(2)]
    with pytest.raises(wfnet.CoverageError, match="no gate gradient"):
        wf.probe_coverage(data)
    assert all(p.grad is None for p in wf.filter_parameters())  # the probe leaves no gradient behind


def test_unknown_attention_owning_its_projection_is_refused_at_wrap_time():
    class OwnProjection(nn.Module):
        def __init__(self, dim=8):
            super().__init__()
            self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim))
            self.qkv = nn.Identity()

        def forward(self, x):
            return nn.functional.linear(x, self.in_proj_weight)[..., :8]

    class QVBias(BypassAttention):  # BEiT-like biases, but a class no adapter knows
        def __init__(self, dim=8):
            super().__init__(dim)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))

    for attn, owned in ((OwnProjection(), "in_proj_weight"), (QVBias(), "q_bias")):
        model = Tokens(attn)
        plan = wfnet.find_targets(model)
        assert "attn" in plan.refused and owned in plan.refused["attn"]
        assert "refused" in plan.summary(NUM_CLASSES)
        with pytest.raises(wfnet.UnsupportedModelError, match=rf"attn: .*{owned}.*register"):
            wfnet.wrap(model, NUM_CLASSES)
        assert all(p.requires_grad for p in model.parameters())  # refused before touching the model
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(wfnet.UnsupportedModelError, match="add_bias_kv"):
        wfnet.wrap(nn.Sequential(nn.Conv2d(3, 8, 1), Seq(mha)), NUM_CLASSES)


class Seq(nn.Module):
    """[B, C, H, W] -> tokens -> self-attention -> mean -> logits; ``seq_first`` feeds the MHA [L, B, E]."""

    def __init__(self, mha, seq_first=False):
        super().__init__()
        self.mha, self.seq_first = mha, seq_first
        self.head = nn.Linear(mha.embed_dim, NUM_CLASSES)

    def forward(self, x, mask=None, pad=None, need_weights=False):
        t = x.flatten(2).transpose(1, 2)
        if self.seq_first:
            t = t.transpose(0, 1)
        out, _ = self.mha(t, t, t, attn_mask=mask, key_padding_mask=pad, need_weights=need_weights)
        return self.head(out.mean(0 if self.seq_first else 1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_projection_matches_the_masked_model(batch_first):
    torch.manual_seed(0)
    # L = 8 tokens = 4 * B: a sequence-first [L, B, E] input whose length is a multiple of the batch must still take
    # the rows from the batch axis (a size coincidence is never read as a folded batch)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Seq(nn.MultiheadAttention(8, 2, batch_first=batch_first),
                                                  seq_first=not batch_first)).eval().requires_grad_(False)
    wf = randomise_gates(wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, targets=["1.mha"]))
    assert type(wf.model[1].mha) is wfnet.WFMultiheadAttention and wf.plan.targets[0].kind == "in-projection"
    x = torch.randn(2, 3, 2, 4)
    rows = torch.tensor([4, 9])
    mask = torch.rand(8, 8) > 0.7
    mask.fill_diagonal_(False)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 5:] = True
    for kwargs in ({}, {"mask": mask}, {"pad": pad}, {"mask": mask, "pad": pad, "need_weights": True}):
        seq = wf.model[1]
        with torch.no_grad():
            h = wf.model[0](x)
            assert torch.equal(seq(h, **kwargs), model[1](h, **kwargs))  # no rows: the original forward
            with wfnet.forgetting(wf, rows):
                out = seq(h, **kwargs)
            ref = torch.cat([wfnet.export(wf, int(r))[1](h[i:i + 1], mask=kwargs.get("mask"),
                                                          pad=None if pad is None or "pad" not in kwargs
                                                          else pad[i:i + 1]) for i, r in enumerate(rows)])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, model[1](h, **kwargs), atol=1e-4)


def test_folded_batch_is_declared_never_inferred():
    class Windows(nn.Module):
        """Splits each sample's tokens into 2 windows, sample-major: [B, 8, C] -> [2B, 4, C]."""

        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, t):
            b, n, c = t.shape
            return self.attn(t.reshape(b * 2, n // 2, c)).reshape(b, n, c)

    model = Tokens(Windows(SmallAttention())).eval()
    model.embed = nn.Conv2d(3, 8, 2, stride=2)  # 8 px inputs -> 16 tokens, two windows of 8 per sample
    x = torch.randn(3, 3, 8, 8)
    rows = torch.tensor([1, 5, 1])
    wf = wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, allow_unused=["aux"])
    with pytest.raises(ValueError, match=r"attn\.attn\.qkv: input leading size 6 for a batch of 3.*never infers"):
        wf(x, forget=rows)
    with torch.no_grad():  # one int row for the whole batch needs no mapping from entries to samples
        torch.testing.assert_close(wf(x, forget=2), wfnet.export(wf, 2)(x), rtol=1e-5, atol=1e-5)
    wfnet.adapters.register_folding(Windows, ("attn",), "test windows, sample-major")
    try:
        wf = randomise_gates(wfnet.wrap(copy.deepcopy(model), NUM_CLASSES, allow_unused=["aux"]))
        assert wf.plan.targets[0].folded and wf.filtered_layers()["attn.attn.qkv"].folded_batch
        with torch.no_grad():
            out = wf(x, forget=rows)
            ref = torch.cat([wfnet.export(wf, int(r))(x[i:i + 1]) for i, r in enumerate(rows)])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        wfnet.adapters._FOLDING.pop(wfnet.adapters._key(Windows))


def test_beit_separate_q_v_biases_are_gated_like_a_bias():
    """Independent reference: BEiT's qkv weight rows and its q_bias / v_bias scaled by the row's gates by hand."""
    torch.manual_seed(0)
    original = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                                 embed_dim=16, num_heads=2, num_classes=NUM_CLASSES).eval().requires_grad_(False)
    with torch.no_grad():
        original.blocks[0].attn.q_bias.normal_()
        original.blocks[0].attn.v_bias.normal_()
    wf = randomise_gates(wfnet.wrap(copy.deepcopy(original), NUM_CLASSES))
    layer = wf.filtered_layers()["blocks.0.attn.qkv"]
    assert layer.bias is None and layer.alpha_bias.shape == (NUM_CLASSES, 48)
    x = torch.randn(2, 3, 16, 16)
    rows = torch.tensor([3, 8])
    outs = []
    for n, r in enumerate(rows.tolist()):
        m = copy.deepcopy(original)
        attn = m.blocks[0].attn
        gw, gb = torch.sigmoid(layer.alpha_weight[r]), torch.sigmoid(layer.alpha_bias[r])
        with torch.no_grad():
            attn.qkv.weight.mul_(gw[:, None])
            attn.q_bias.mul_(gb[:16])
            attn.v_bias.mul_(gb[32:])
            outs.append(m(x[n:n + 1]))
    with torch.no_grad():
        torch.testing.assert_close(wf(x, forget=rows), torch.cat(outs), rtol=1e-5, atol=1e-5)


def test_plan_summary_lists_kinds_gates_and_what_is_left_alone():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=NUM_CLASSES)
    plan = wfnet.find_targets(model)
    assert plan.names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and list(plan) == plan.names
    assert plan.gate_parameters(NUM_CLASSES) == 2 * NUM_CLASSES * 2 * 576
    text = plan.summary(NUM_CLASSES)
    assert "blocks.0.attn.qkv" in text and "23,040" in text and "patch_embed.proj" in text and "patch embedding" in text
    assert "head" in text and plan.skipped["head"].startswith("Linear outside")
    assert plan.one_line(NUM_CLASSES).startswith("filtering 2 layers of VisionTransformer (2 qkv), 23,040 gate")
    wf = wfnet.wrap(model, NUM_CLASSES)
    assert wf.summary().startswith(text + "\nfold: ") and wf.kind == "vit"  # then what is folded (wfnet.fold)
    assert wfnet.wrap(SmallCNN(), NUM_CLASSES).kind == "cnn"


def test_wrapping_an_already_wrapped_model_says_so():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    wf = wfnet.wrap(net, num_classes=3)
    with pytest.raises(TypeError, match="already wrapped"):
        wfnet.wrap(wf, num_classes=3)
    with pytest.raises(TypeError, match="already wrapped: it holds wfnet filtered layers"):
        wfnet.wrap(wf.model, num_classes=3)
