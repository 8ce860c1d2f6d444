"""wrap's refusals and declarations beyond attention (issue 25 items 4 and 5): training-only auxiliary heads
(torchvision GoogLeNet / Inception-v3), a num_classes that disagrees with the classifier head, non-Module models, and
unbatched inputs into the filtered layers."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import wfnet
from wfnet.layers import WFConv2d, WFLinear

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

NC = 10
ROWS = torch.tensor([7, 2])


def _randomise(wf, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return wf


def _googlenet():
    torch.manual_seed(0)
    return torchvision.models.GoogLeNet(num_classes=NC, aux_logits=True, init_weights=False).eval()


# ------------------------------------------------------------------------------------- training-only aux heads
def test_googlenet_aux_heads_are_declared_training_only():
    original = _googlenet().requires_grad_(False)
    wf = _randomise(wfnet.wrap(copy.deepcopy(original), NC))  # no allow_unused needed
    aux = [t.name for t in wf.plan.targets if t.training_only]
    assert aux == ["aux1.conv.conv", "aux2.conv.conv"]  # filtered like every conv, and labelled
    assert "training-only head" in wf.summary()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    # eval: the heads do not run, and the guard does not demand them; the rest behaves as everywhere
    with torch.no_grad():
        routed = wf(x, forget=ROWS)
        assert torch.equal(wf(x), original(x))
        ref = torch.cat([wfnet.export(wf, int(r))(x[i:i + 1]) for i, r in enumerate(ROWS)])
    torch.testing.assert_close(routed, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    wf.check_gradient_coverage(x, ROWS)

    # training: the heads run, so they are demanded (their output reaches the aux logits of the tuple output)
    wf.train()
    out = wf(x, forget=ROWS)
    assert type(out).__name__ == "GoogLeNetOutputs" and out.aux_logits1.shape == (2, NC)
    wf.check_gradient_coverage(x, ROWS)
    loss = sum(F.cross_entropy(o, torch.tensor([3, 5])) for o in out)
    loss.backward()
    layers = wf.filtered_layers()
    assert layers["aux1.conv.conv"].alpha_weight.grad.any() and layers["aux2.conv.conv"].alpha_weight.grad.any()

    # a training-mode forward that skips a declared head still raises; in eval the same skip is expected
    wf.model.aux1.forward = lambda t: torch.zeros(t.shape[0], NC)
    with pytest.raises(wfnet.CoverageError, match=r"aux1\.conv\.conv"):
        wf(x, forget=ROWS)
    wf.eval()
    wf(x, forget=ROWS)


def test_inception_v3_eval_needs_no_opt_out():
    torch.manual_seed(0)
    original = torchvision.models.Inception3(num_classes=NC, aux_logits=True, init_weights=False).eval()
    wf = _randomise(wfnet.wrap(copy.deepcopy(original).requires_grad_(False), NC))
    assert [t.name for t in wf.plan.targets if t.training_only] == ["AuxLogits.conv0.conv", "AuxLogits.conv1.conv"]
    x = torch.randn(2, 3, 75, 75, generator=torch.Generator().manual_seed(1))  # 75: Inception-v3's smallest input
    with torch.no_grad():
        routed = wf(x, forget=ROWS)  # raised CoverageError (AuxLogits never ran) before the declaration
        assert torch.equal(wf(x), original.requires_grad_(False)(x))
    assert not torch.equal(routed, wf(x))  # untrained Inception-v3 (default BN statistics) varies little
    with wfnet.forgetting(wf, 3):  # the guard of a forgetting() block skips the idle head too
        wf.model(x)


def test_training_only_declaration_requires_the_head():
    # torchvision's aux_logits=False sets the head to None: nothing declared, nothing to skip
    model = torchvision.models.GoogLeNet(num_classes=NC, aux_logits=False, init_weights=False).eval()
    assert wfnet.adapters.find_training_only(model) == {}
    heads = wfnet.adapters.find_training_only(_googlenet())
    assert set(heads) == {"aux1", "aux2"} and heads["aux1"][0] == ""


# ------------------------------------------------------------------------------------------- num_classes vs head
class Net(nn.Module):
    def __init__(self, outputs=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, outputs)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_num_classes_must_match_the_classifier_head():
    model = Net(5)
    with pytest.raises(ValueError, match=r"num_classes=3 but Net's classifier head head has 5 outputs.*"
                                         r"num_classes=5, or check_head=False"):
        wfnet.wrap(model, num_classes=3)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching the model
    with pytest.raises(ValueError, match=r"has 5 outputs.*Pass num_classes=5$"):  # more rows than outputs
        wfnet.wrap(Net(5), num_classes=7)
    wf = wfnet.wrap(Net(5), num_classes=3, check_head=False)  # the documented override: a subset of the classes
    assert wf.num_classes == 3 and wf(torch.randn(2, 3, 6, 6), forget=2).shape == (2, 5)
    assert wfnet.wrap(Net(5), num_classes=5).num_classes == 5


@pytest.mark.parametrize("build, outputs, where", [
    (lambda: torchvision.models.resnet18(num_classes=4), 4, "fc"),
    (lambda: torchvision.models.squeezenet1_1(num_classes=4), 4, r"classifier\.1"),  # a 1x1 conv classifier
    (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                               depth=1), 4, r"get_classifier\(\)"),
])
def test_head_check_reads_declared_heads(build, outputs, where):
    with pytest.raises(ValueError, match=rf"head {where} has {outputs} outputs"):
        wfnet.wrap(build(), num_classes=outputs + 1)


def test_head_check_skips_unknown_heads():
    # a timm feature extractor (num_classes=0: get_classifier() is an Identity) has no classifier to compare with;
    # its last Linear is an MLP layer, which must not be taken for a head
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                                 depth=1)
    assert wfnet.wrap(backbone, num_classes=3).num_classes == 3
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))  # no head attr
    assert wfnet.wrap(seq, num_classes=2).num_classes == 2


@pytest.mark.parametrize("bad, error", [("str", TypeError), (None, TypeError), (nn.Conv2d, TypeError),
                                        ({"conv": nn.Conv2d(3, 4, 3)}, TypeError)])
def test_wrap_refuses_what_is_not_a_module(bad, error):
    with pytest.raises(error, match="wrap expects a torch.nn.Module"):
        wfnet.wrap(bad, num_classes=3)


@pytest.mark.parametrize("num_classes, error, match", [(2.5, TypeError, "must be an int"),
                                                       ("5", TypeError, "must be an int"),
                                                       (True, TypeError, "must be an int"),
                                                       (0, ValueError, ">= 1")])
def test_wrap_checks_num_classes(num_classes, error, match):
    with pytest.raises(error, match=match):
        wfnet.wrap(Net(5), num_classes=num_classes)


def test_wrap_takes_integer_like_num_classes():
    import numpy as np

    assert wfnet.wrap(Net(5), num_classes=np.int64(5)).num_classes == 5


# --------------------------------------------------------------------------------------------- unbatched inputs
def _layers():
    torch.manual_seed(0)
    conv = _randomise_layer(WFConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 5))
    linear = _randomise_layer(WFLinear.from_linear(nn.Linear(6, 4), 5))
    return conv, linear


def _randomise_layer(layer):
    with torch.no_grad():
        layer.alpha_weight.normal_(0, 2)
        layer.alpha_bias.normal_(0, 2)
    return layer


def test_unbatched_sample_is_one_sample_as_in_torch():
    conv, linear = _layers()
    x, v = torch.randn(3, 8, 8), torch.randn(6)
    for layer, sample, plain in ((conv, x, nn.Conv2d), (linear, v, nn.Linear)):
        batched = layer(sample.unsqueeze(0), forget=1)[0]
        for forget in (1, torch.tensor([1]), [1]):
            out = layer(sample, forget=forget)
            assert out.shape == batched.shape
            torch.testing.assert_close(out, batched, rtol=0, atol=0)
        assert torch.equal(layer(sample), plain.forward(layer, sample))  # no rows: the plain layer
        assert not torch.allclose(layer(sample, forget=1), layer(sample))
    # a gradient reaches the gates through the unbatched path too
    conv(x, forget=2).sum().backward()
    assert conv.alpha_weight.grad[2].any() and not conv.alpha_weight.grad[1].any()


def test_unbatched_sample_with_several_rows_or_wrong_rank_raises():
    conv, linear = _layers()
    with pytest.raises(ValueError, match=r"unbatched input \[3, 8, 8\], \[C, H, W\], is one sample.*shape \[1\]"):
        conv(torch.randn(3, 8, 8), forget=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"unbatched input \[6\].*out of range"):
        linear(torch.randn(6), forget=9)
    with pytest.raises(ValueError, match=r"expects an input \[B, C, H, W\].*got shape \[8, 8\]"):
        conv(torch.randn(8, 8), forget=1)
    with pytest.raises(ValueError, match=r"expects an input \[B, \.\.\., 6\].*0-d"):
        linear(torch.tensor(1.0), forget=1)


def test_unbatched_input_in_a_routed_model_raises():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(0), nn.Linear(4, 5))
    wf = wfnet.wrap(net, 5, targets=["0"])
    x = torch.randn(3, 8, 8)
    assert wf(x).shape == (5,)  # forget=None: the original model, which takes it
    with pytest.raises(ValueError, match=r"filtered layer 0: an unbatched input \[3, 8, 8\].*batched input "
                                         r"\[B, C, H, W\]"):
        wf(x, forget=1)
    assert not wf.router.active()
