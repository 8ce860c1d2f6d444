"""A zoo sweep: torchvision and timm classifiers of every family, built tiny (no weights downloaded), wrapped with
targets="auto". For each: the plan filters the family's attention projections (and, for CNNs / hybrids, convs) and
refuses nothing; every filtered layer runs in a routed forward; random gates change the first filtered layer's output;
forget=None is the original model bit for bit; the output equals a per-sample masked-weight model (each sample run
alone through ``wfnet.export`` of its row, which bakes the gates into plain layers); one untraining step gives every
filtered layer a non-zero gate gradient. Models that cannot be supported raise at wrap time with their reason.
"""
import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import densenet, mobilenetv2, mobilenetv3, resnet, swin_transformer

import wfnet
from wfnet.models import SmallCNN

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

NC = 10
ROWS = torch.tensor([7, 2])


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=NC, **kw)


def _tv(fn, *args, **kw):
    return lambda: fn(*args, num_classes=NC, **kw)


# name -> (builder, input size, what auto must filter: {"conv", "attention"})
ZOO = {
    # CNNs: every conv
    "plain_cnn": (lambda: SmallCNN(NC, in_chans=3, widths=(8, 16, 16)), 16, {"conv"}),
    "resnet_basic": (_tv(resnet.ResNet, resnet.BasicBlock, [1, 1, 1, 1]), 32, {"conv"}),
    "resnext_grouped": (_tv(resnet.ResNet, resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4), 32,
                        {"conv"}),
    "mobilenet_v2_depthwise": (_tv(mobilenetv2.MobileNetV2, width_mult=0.25), 32, {"conv"}),
    "mobilenet_v3_se": (lambda: mobilenetv3.mobilenet_v3_small(num_classes=NC, width_mult=0.25), 32, {"conv"}),
    "densenet": (_tv(densenet.DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2), 32,
                 {"conv"}),
    # transformers: projections only (the patchify embedding stays plain)
    "vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32, {"attention"}),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2), 32,
                       {"attention"}),
    "swin_windows": (_timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2)), 32, {"attention"}),
    "swinv2_windows_qv_bias": (_timm("swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16,
                                     depths=(2, 2), num_heads=(1, 2)), 32, {"attention"}),
    "beit_qv_bias": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
                     32, {"attention"}),
    "eva_rotary": (_timm("eva02_tiny_patch14_224", img_size=32, patch_size=8, depth=2), 32, {"attention"}),
    "cait_class_attn": (_timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2), 32, {"attention"}),
    "convit_qk_v": (_timm("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=1), 32,
                    {"attention"}),
    "torchvision_vit_mha": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=NC), 32,
        {"attention"}),
    "torchvision_swin_functional": (lambda: swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4], num_classes=NC), 32,
        {"attention"}),
    # hybrids: projections and convs
    "levit_linear_norm": (_timm("levit_128s", img_size=64), 64, {"attention", "conv"}),
    "coatnet_conv_qkv": (_timm("coatnet_nano_rw_224", img_size=32), 32, {"attention", "conv"}),
    "pvt_v2_spatial_reduction": (_timm("pvt_v2_b0", depths=(1, 1, 1, 1)), 32, {"attention", "conv"}),
    "xcit_class_attn": (_timm("xcit_nano_12_p16_224", img_size=32, depth=2), 32, {"attention", "conv"}),
    "mobilevit_folded": (_timm("mobilevit_xxs"), 32, {"attention", "conv"}),
    "efficientformer_v2_qkv_convs": (_timm("efficientformerv2_s0", img_size=64), 64, {"attention", "conv"}),
    # window attention on sample-major folded batches (declared by adapters), MViTv2's pooling convs on [B * heads];
    # GCViT at depth 2 per stage: its odd blocks are the ones that read the global query (depth 1 leaves the
    # query generator's convs without any effect on the output, which the gradient probe rightly refuses)
    "davit_windows_and_channels": (_timm("davit_tiny", depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                                         window_size=4), 32, {"attention", "conv"}),
    "tinyvit_windows": (lambda: timm.models.tiny_vit.TinyVit(
        num_classes=NC, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        window_sizes=(4, 4, 4, 2)), 64, {"attention", "conv"}),
    "gcvit_global_query_windows": (lambda: timm.models.gcvit.GlobalContextVit(
        num_classes=NC, img_size=64, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)), 64,
        {"attention", "conv"}),
    "mvitv2_pooling_convs": (lambda: timm.models.mvitv2.MultiScaleVit(timm.models.mvitv2.MultiScaleVitCfg(
        depths=(1, 1), embed_dim=16, num_heads=1, stride_q=((1, 1), (2, 2))), img_size=32, num_classes=NC), 32,
        {"attention", "conv"}),
}


@functools.lru_cache(maxsize=None)
def _original(name):
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # nothing degenerate: zero-initialised biases (BEiT's q/v biases) and tiny layer scales (CaiT's 1e-5) get
        # random values, BN statistics too, so that every gate (bias gates included) matters
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    # frozen, as wrap leaves it: some ops pick their kernel by requires_grad (F.linear folds a 4-d input differently
    # when the weight requires grad), so only a frozen original is bit-comparable
    return model.requires_grad_(False)


def _randomise(wf, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return wf


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model(name):
    original = _original(name)
    size, expected = ZOO[name][1], ZOO[name][2]
    x = torch.randn(len(ROWS), 3, size, size, generator=torch.Generator().manual_seed(2))
    plan = wfnet.find_targets(original)
    assert not plan.refused
    has_attention = any(t.attention for t in plan.targets)
    has_conv = any("conv" in t.kind and not t.attention for t in plan.targets)
    assert {"attention"} <= expected if has_attention else "attention" not in expected
    assert has_conv == ("conv" in expected)
    if has_attention:  # every attention module found has every projection filtered
        projections = {leaf for site in wfnet.adapters.find_attention(original) for _, leaf in site.projections}
        assert projections <= set(plan.names)
    wf = _randomise(wfnet.wrap(copy.deepcopy(original), NC))
    assert wf.layer_names == plan.names and wf.summary().count("\n") > len(plan)
    layers = wf.filtered_layers()

    # every filtered layer runs in a routed forward
    with torch.no_grad(), wf.router.route(ROWS, len(ROWS)) as frame:
        out = wf.model(x)
    assert frame.used == {id(m) for m in layers.values()}

    # random gates change the first filtered layer's output; forget=None is the original model
    first = next(iter(layers.values()))
    seen = []  # (first layer's plain output, its gated output) of the routed forward
    if plan.targets[0].functional:  # its parent calls layer.linear (the F.linear route), not the module
        first.linear = lambda inp, bias, f=first.linear: seen.extend([F.linear(inp, first.weight, bias), f(inp, bias)]) \
            or seen[-1]
        hook = None
    else:
        hook = first.register_forward_hook(lambda m, i, o: seen.extend(
            [(nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear).forward(m, *i), o]
            if not isinstance(m, nn.MultiheadAttention)
            else [nn.MultiheadAttention.forward(m, *i, need_weights=False)[0], o[0]]))
    with torch.no_grad():
        plain = wf(x)
        routed = wf(x, forget=ROWS)
        original_out = original(x)
    if hook is not None:
        hook.remove()
    first.__dict__.pop("linear", None)
    assert len(seen) >= 2  # the last pair: the routed forward's (plain, gated) outputs of the first layer
    assert not torch.allclose(seen[-2], seen[-1])
    assert torch.equal(plain, original_out)
    # not bit for bit: the hook above disables the first layer's fold (wfnet.fold) in this forward, so its BatchNorm
    # runs separately (rounding only)
    torch.testing.assert_close(routed, out, rtol=1e-5, atol=1e-5 * out.abs().max().item())

    # per-sample masked-weight model: each sample alone through a plain copy with its row's gates baked in
    with torch.no_grad():
        ref = torch.cat([wfnet.export(wf, int(r))(x[i:i + 1]) for i, r in enumerate(ROWS)])
    scale = ref.abs().max().item()
    torch.testing.assert_close(routed, ref, rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(routed, plain, rtol=1e-3, atol=1e-3 * scale)

    # one untraining step: every filtered layer gets gate gradient
    wf.check_gradient_coverage(x, ROWS)
    loss = F.cross_entropy(wf(x, forget=ROWS), torch.tensor([3, 5]))
    loss.backward()
    dead = [n for n, m in layers.items() if m.alpha_weight.grad is None or not m.alpha_weight.grad.any()]
    assert not dead
