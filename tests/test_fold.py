"""The fold (wfnet.fold): a filtered layer + the eval-mode BatchNorm (+ activation) after it in one pass.

Checked against the unfolded reference (the same model wrapped with fold=False: gate pass, then the BatchNorm and
activation modules): outputs AND gate gradients, on the torch, naive and triton (interpreter) backends, fp32 / bf16,
channels_last, grouped convs, every foldable activation; the detection on torchvision ResNet (BasicBlock /
Bottleneck, whose shared ReLU module is folded only for the call on the BatchNorm's output), VGG-BN, MobileNet-V3
(Conv2dNormActivation) and timm ConvNormAct / BatchNormAct2d; what disables it (train-mode BatchNorm, hooks, a data
flow that differs from the trace); forget=None bit for bit; export / save / load / deepcopy / pickle / compile.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import wfnet
from wfnet import fold as wfold
from wfnet.fold import Affine

NC = 5
BACKENDS = ["torch", "naive", "triton"]
ACTS = [nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid]


def _randomise_norms(model, gen):
    """Non-trivial eval statistics and affine parameters (signs included), so a missing / doubled BatchNorm shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) * 3 - 1.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _pair(model, gen, **wrap_kw):
    """(unfolded reference, folded) wrapped copies of ``model`` with the same random gates."""
    ref = wfnet.wrap(copy.deepcopy(model), NC, fold=False, check_head=False, **wrap_kw)
    wf = wfnet.wrap(model, NC, check_head=False, **wrap_kw)
    with torch.no_grad():
        for p, q in zip(ref.filter_parameters(), wf.filter_parameters()):
            v = torch.randn(p.shape, generator=gen) * 2
            p.copy_(v)
            q.copy_(v)
    return ref, wf


def _run(wf, x, rows, grad_out=None):
    for p in wf.filter_parameters():
        p.grad = None
    out = wf(x, forget=rows)
    out.float().backward(torch.ones_like(out, dtype=torch.float32) if grad_out is None else grad_out)
    return out.detach(), [p.grad.clone() for p in wf.filter_parameters()]


def _close(a, b, tol):
    scale = max(a.abs().max().item(), 1e-3)
    return (a.float() - b.float()).abs().max().item() <= tol * scale


class Calls(TorchFunctionMode):
    """Counts the functional calls the BatchNorm / activation modules make (what the fold removes)."""

    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _chain(act, groups=1, cl=False, bias=True):
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), act(),
                         nn.Conv2d(8, 6, 3, stride=2, groups=groups, bias=False), nn.BatchNorm2d(6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 7), nn.BatchNorm1d(7), act(),
                         nn.Linear(7, NC))


# ------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_outputs_and_gate_gradients_match_unfolded(backend, act):
    gen = torch.Generator().manual_seed(hash(act.__name__) % 1000)
    model = _randomise_norms(_chain(act, groups=2), gen)
    ref, wf = _pair(model, gen, targets=["0", "3", "7"])
    assert [c[0] for c in wf.fold_plan.chains] == ["0", "3", "7"]
    x = torch.randn(3, 4, 9, 9, generator=gen)
    rows = torch.tensor([0, 3, 4])
    with wfnet.use_backend(backend):
        out_r, g_r = _run(ref, x, rows)
        with Calls() as calls:
            out_f, g_f = _run(wf, x, rows)
    assert calls.n.get("batch_norm", 0) == 0  # every BatchNorm folded: none ran
    assert _close(out_r, out_f, 1e-5)
    for a, b in zip(g_r, g_f):
        assert _close(a, b, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["bf16", "channels_last", "nobias_groups"])
def test_precisions_layouts_groups(backend, case):
    gen = torch.Generator().manual_seed(7)
    model = _randomise_norms(_chain(nn.SiLU, groups=2 if case == "nobias_groups" else 1,
                                    bias=case != "nobias_groups"), gen)
    ref, wf = _pair(model, gen, targets=["0", "3"])
    x = torch.randn(2, 4, 10, 8, generator=gen)
    rows = torch.tensor([1, 4])
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        ref.model.to(memory_format=torch.channels_last)
        wf.model.to(memory_format=torch.channels_last)
    with wfnet.use_backend(backend):
        out32, g32 = _run(ref, x, rows)
        if case == "bf16":  # both in bf16; the folded error vs fp32 must be of the unfolded one's order
            ref.model.to(torch.bfloat16)
            wf.model.to(torch.bfloat16)
            for p in list(ref.filter_parameters()) + list(wf.filter_parameters()):
                p.data = p.data.float()
            x = x.bfloat16()
            out_r, g_r = _run(ref, x, rows)
            out_f, g_f = _run(wf, x, rows)
            err_r = (out_r.float() - out32).abs().max().item()
            err_f = (out_f.float() - out32).abs().max().item()
            assert err_f <= 2 * err_r + 2e-2 * out32.abs().max().item()
            for a, b, c in zip(g32, g_r, g_f):
                assert (c - a).abs().max() <= 2 * (b - a).abs().max() + 6e-2 * a.abs().max()
            return
        out_f, g_f = _run(wf, x, rows)
    assert _close(out32, out_f, 1e-5)
    for a, b in zip(g32, g_f):
        assert _close(a, b, 1e-5)


@pytest.mark.parametrize("path", ["implicit_gemm", "epilogue"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "hardswish"])
def test_triton_paths_with_activation(path, act):
    """Both Triton conv paths (implicit GEMM epilogue, cuDNN + fused pass) and both linear paths, forward and the
    fused backward with the activation's derivative, against torch autograd of the same formula."""
    kops = pytest.importorskip("wf_kernels.ops")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, generator=gen)
    g = torch.rand(2, 5, generator=gen).requires_grad_(True)
    gb = torch.randn(2, 5, generator=gen).requires_grad_(True)
    out = kops.wf_conv2d(x, w, None, None, None, None, (1, 1), (1, 1), (1, 1), 1, path=path, gates=(g, gb), act=act)
    ref = wfold.activate(F.conv2d(x, w, None, 1, 1) * g[:, :, None, None] + gb[:, :, None, None], act, False)
    go = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (x, g, gb), go)
    grads_ref = torch.autograd.grad(ref, (x, g, gb), go)
    assert _close(ref.detach(), out.detach(), 1e-5)
    for a, b in zip(grads_ref, grads):
        assert _close(a, b, 1e-5)
    lpath = "gemm" if path == "implicit_gemm" else "epilogue"
    xl = torch.randn(3, 8, generator=gen, requires_grad=True)
    wl = torch.randn(4, 8, generator=gen)
    gl = torch.rand(3, 4, generator=gen).requires_grad_(True)
    gbl = torch.randn(3, 4, generator=gen).requires_grad_(True)
    outl = kops.wf_linear(xl, wl, None, None, None, None, path=lpath, gates=(gl, gbl), act=act)
    refl = wfold.activate(F.linear(xl, wl) * gl + gbl, act, False)
    gol = torch.randn(outl.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(refl, (xl, gl, gbl), gol), torch.autograd.grad(outl, (xl, gl, gbl), gol)):
        assert _close(a, b, 1e-5)


def test_affine_is_the_batchnorm():
    bn = _randomise_norms(nn.BatchNorm2d(6), torch.Generator().manual_seed(1))
    y = torch.randn(2, 6, 3, 3)
    a = Affine.of(bn)
    assert torch.allclose(bn(y), y * a.scale.view(1, -1, 1, 1) + a.shift.view(1, -1, 1, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------- detection
def _chains(wf):
    return {layer: (norm, act) for layer, norm, act in wf.fold_plan.chains}


def test_resnet_basicblock_and_bottleneck_shared_relu():
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    gen = torch.Generator().manual_seed(0)
    for block, layers in ((BasicBlock, [1, 1, 1, 1]), (Bottleneck, [1, 1, 1, 1])):
        model = _randomise_norms(ResNet(block, layers, num_classes=NC), gen)
        ref, wf = _pair(model, gen)
        ch = _chains(wf)
        assert len(ch) == len(wf.layer_names)  # every conv is followed by its own BatchNorm
        assert ch["conv1"] == ("bn1", "relu") and ch["layer1.0.conv1"] == ("layer1.0.bn1", "layer1.0.relu")
        last = "conv3" if block is Bottleneck else "conv2"
        bn_last = "bn3" if block is Bottleneck else "bn2"
        assert ch[f"layer1.0.{last}"] == (f"layer1.0.{bn_last}", "")  # then the residual add, not the relu
        assert ch["layer2.0.downsample.0"] == ("layer2.0.downsample.1", "")
        x = torch.randn(2, 3, 32, 32, generator=gen)
        rows = torch.tensor([2, 4])
        out_r, g_r = _run(ref, x, rows)
        with Calls() as calls:
            out_f, g_f = _run(wf, x, rows)
        # the shared relu module runs only where it is NOT folded: after each block's residual add
        assert calls.n.get("relu", 0) == 4 and calls.n.get("batch_norm", 0) == 0
        assert _close(out_r, out_f, 1e-5) and all(_close(a, b, 1e-5) for a, b in zip(g_r, g_f))
    assert torchvision  # noqa


def test_vgg_bn_and_mobilenet_v3():
    import torchvision
    from torchvision.models.vgg import VGG, make_layers

    gen = torch.Generator().manual_seed(1)
    vgg = VGG(make_layers([8, "M", 16, 16, "M"], batch_norm=True), num_classes=NC, init_weights=False)
    vgg.classifier = nn.Linear(16 * 7 * 7, NC)
    ref, wf = _pair(_randomise_norms(vgg, gen), gen)
    assert _chains(wf) == {"features.0": ("features.1", "features.2"), "features.4": ("features.5", "features.6"),
                           "features.7": ("features.8", "features.9")}
    x = torch.randn(2, 3, 16, 16, generator=gen)
    out_r, g_r = _run(ref, x, 1)
    out_f, g_f = _run(wf, x, 1)
    assert _close(out_r, out_f, 1e-5) and all(_close(a, b, 1e-5) for a, b in zip(g_r, g_f))

    mnv3 = _randomise_norms(torchvision.models.mobilenet_v3_small(num_classes=NC), gen)
    ref, wf = _pair(mnv3, gen)
    ch = _chains(wf)
    acts = {type(wf.model.get_submodule(a)).__name__ for _, a in ch.values() if a}
    assert acts == {"ReLU", "Hardswish"}
    se = [n for n in wf.layer_names if ".fc" in n]  # squeeze-excitation convs: no BatchNorm after them
    assert se and not set(se) & set(ch)
    assert all(wf.fold_plan.unfolded[n].endswith("not a BatchNorm2d / timm BatchNormAct2d") for n in se), \
        {n: wf.fold_plan.unfolded[n] for n in se}
    assert len(ch) == len(wf.layer_names) - len(se)
    project = [n for n in ch if ch[n][1] == ""]  # the linear-bottleneck projections: BatchNorm, no activation
    assert project
    x = torch.randn(2, 3, 32, 32, generator=gen)
    out_r, g_r = _run(ref, x, torch.tensor([0, 3]))
    out_f, g_f = _run(wf, x, torch.tensor([0, 3]))
    assert _close(out_r, out_f, 1e-4) and all(_close(a, b, 1e-4) for a, b in zip(g_r, g_f))


def test_timm_conv_norm_act_and_batchnormact():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, ConvNormAct

    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(ConvNormAct(3, 8, 3, act_layer=nn.SiLU), ConvNormAct(8, 8, 3, apply_act=False),
                          ConvNormAct(8, 6, 1, act_layer="gelu_tanh"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, NC))
    ref, wf = _pair(_randomise_norms(model, gen), gen)
    ch = _chains(wf)
    assert ch["0.conv"] == ("0.bn", "0.bn.act")  # BatchNormAct2d's own SiLU folded
    assert ch["1.conv"] == ("1.bn", "")          # no activation
    assert ch["2.conv"] == ("2.bn", "")          # tanh-GELU is not folded: the BatchNorm is, the act still runs
    assert isinstance(wf.model[0].bn, BatchNormAct2d)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    out_r, g_r = _run(ref, x, torch.tensor([1, 2]))
    with Calls() as calls:
        out_f, g_f = _run(wf, x, torch.tensor([1, 2]))
    assert calls.n.get("batch_norm", 0) == 0 and calls.n.get("gelu", 0) == 1
    assert _close(out_r, out_f, 1e-5) and all(_close(a, b, 1e-5) for a, b in zip(g_r, g_f))
    net = timm.create_model("mobilenetv3_small_050", num_classes=NC)
    wfm = wfnet.wrap(net, NC)
    assert wfm.fold_plan.error is None and len(wfm.fold_plan.chains) > 10, wfm.fold_plan.summary()


def test_unprovable_chains_stay_unfolded():
    class Branchy(nn.Module):  # the conv output is read twice: not provably BatchNorm-only
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            z = self.conv(x)
            y = self.bn2(self.conv2(self.act(self.bn(z)) + z))
            return self.act(y).mean((2, 3)) + y.sum() * 0  # bn2's output read twice: no activation folded

    wf = wfnet.wrap(Branchy(), 4, check_head=False)
    assert _chains(wf) == {"conv2": ("bn2", "")}
    assert "read by 2 operations" in wf.fold_plan.unfolded["conv"]

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.bn(self.conv(x)).mean((2, 3))

    wf = wfnet.wrap(Untraceable(), 4, check_head=False)
    assert wf.fold_plan.chains == [] and "torch.fx cannot trace" in wf.fold_plan.error
    assert "fold: none (torch.fx cannot trace" in wf.summary()
    x = torch.randn(2, 3, 4, 4)
    assert wf(x, forget=1).shape == (2, 4)


# ------------------------------------------------------------------------------------------------- safety
def _resnet_pair():
    from torchvision.models.resnet import BasicBlock, ResNet

    gen = torch.Generator().manual_seed(5)
    return _pair(_randomise_norms(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NC), gen), gen)


def test_forget_none_is_the_original_bit_for_bit():
    from torchvision.models.resnet import BasicBlock, ResNet

    original = _randomise_norms(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NC), torch.Generator().manual_seed(0))
    wf = wfnet.wrap(copy.deepcopy(original), NC)
    assert wf.fold_plan.chains
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wf(x), original(x))
        assert torch.equal(wf.model(x), original(x))
    # a filtered layer called with an explicit forget= returns its own (unfolded) output
    conv = wf.model.conv1
    assert torch.equal(conv(x, forget=0), wfnet.ops.wf_conv2d(x, conv.weight, conv.bias, conv.alpha_weight,
                                                              conv.alpha_bias, 0, 2, 3))


def test_train_mode_batchnorm_and_hooks_disable_the_fold():
    ref, wf = _resnet_pair()
    x = torch.randn(2, 3, 32, 32)
    rows = torch.tensor([0, 1])

    def batch_norms():
        with Calls() as calls, torch.no_grad():
            out = wf(x, forget=rows)
        return calls.n.get("batch_norm", 0), out

    assert batch_norms()[0] == 0
    wf.model.layer1[0].bn1.train()  # training-mode BatchNorm: batch statistics, not a known affine
    ref.model.layer1[0].bn1.train()
    n, out = batch_norms()
    with torch.no_grad():
        assert n == 1 and _close(ref(x, forget=rows), out, 1e-5)
    wf.model.layer1[0].bn1.eval()
    ref.model.layer1[0].bn1.eval()
    seen = {}
    h = wf.model.layer2[0].conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.clone()))
    h2 = wf.model.layer3[0].bn2.register_forward_pre_hook(lambda m, i: seen.__setitem__("bn", i[0].clone()))
    h3 = wf.model.layer4[0].relu.register_forward_hook(lambda m, i, o: None)  # shared relu: disables its chains
    n, out = batch_norms()
    with torch.no_grad():
        expect = ref(x, forget=rows)
    assert n == 1 + 1 + 1 and _close(expect, out, 1e-5)
    seen_ref = {}
    ref.model.layer2[0].conv1.register_forward_hook(lambda m, i, o: seen_ref.__setitem__("conv", o.clone()))
    ref.model.layer3[0].bn2.register_forward_pre_hook(lambda m, i: seen_ref.__setitem__("bn", i[0].clone()))
    with torch.no_grad():
        ref(x, forget=rows)
    assert _close(seen_ref["conv"], seen["conv"], 1e-6) and _close(seen_ref["bn"], seen["bn"], 1e-6)
    for handle in (h, h2, h3):
        handle.remove()
    assert batch_norms()[0] == 0
    wf.set_fold(False)
    assert batch_norms()[0] == len(wf.layer_names)


def test_broken_data_flow_raises():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.skip_bn = False

        def forward(self, x):
            z = self.conv(x)
            return (z if self.skip_bn else self.bn(z)).mean((2, 3))

    wf = wfnet.wrap(Switch().eval(), 4, check_head=False)
    assert _chains(wf) == {"conv": ("bn", "")}
    wf.model.skip_bn = True  # the traced chain no longer holds: its folded output would be used un-normalised
    with pytest.raises(wfold.FoldError, match="never reached"):
        wf(torch.randn(2, 3, 4, 4), forget=1)
    with pytest.raises(wfold.FoldError):
        with wfnet.forgetting(wf, 1):
            wf.model(torch.randn(2, 3, 4, 4))
    wf.model.skip_bn = False
    assert wf(torch.randn(2, 3, 4, 4), forget=1).shape == (2, 4)


def test_state_export_save_load_copy_pickle(tmp_path):
    ref, wf = _resnet_pair()
    x = torch.randn(2, 3, 32, 32)
    keys = set(ref.state_dict())
    assert set(wf.state_dict()) == keys  # not a weight edit: same parameters and buffers
    plain = wfnet.export(wf, 3)
    assert not any(isinstance(m, wfold._StepAside) for m in plain.modules())
    assert type(plain.bn1) is nn.BatchNorm2d and type(plain.relu) is nn.ReLU
    with torch.no_grad():
        assert _close(wf(x, forget=3), plain(x), 1e-4)
        assert _close(wfnet.export(ref, 3)(x), plain(x), 1e-5)
    wfnet.save_filters(wf, tmp_path / "f.safetensors")
    wfnet.load_filters(ref, tmp_path / "f.safetensors")
    with torch.no_grad():
        expect = ref(x, forget=2)
        for clone in (copy.deepcopy(wf), _pickled(wf)):
            assert isinstance(clone.model.bn1, wfold._StepAside) and clone.model.bn1._wf_router is clone.router
            with Calls() as calls:
                got = clone(x, forget=2)
            assert calls.n.get("batch_norm", 0) == 0 and _close(expect, got, 1e-5)
    wf.probe_coverage(x)  # every filtered layer still gets gate gradient through the fold
    assert "fold: 12 of 12 filtered layers" in wf.summary() and "folded  conv1 -> bn1 -> relu" in wf.summary()


def _pickled(wf):
    buf = io.BytesIO()
    torch.save(wf, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_compile_fullgraph_matches_eager():
    ref, wf = _resnet_pair()
    x = torch.randn(2, 3, 32, 32)
    rows = torch.tensor([1, 3])
    out_r, g_r = _run(ref, x, rows)
    compiled = torch.compile(wf, backend="aot_eager", fullgraph=True)
    out_c, g_c = _run(compiled, x, rows)
    assert _close(out_r, out_c, 1e-5) and all(_close(a, b, 1e-5) for a, b in zip(g_r, g_c))


def test_cuda_backend_takes_the_fold_and_refuses_trainable_batchnorm():
    """The cuda backend's Python side (fake CUDA tensors; the .cu itself needs a GPU: tests/test_cuda_ext.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        from wfnet.backends import cuda as cb
    except ImportError as exc:
        pytest.skip(f"wfnet._C not built: {exc}")
    from wfnet.rows import LayerRows

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device="cuda")
    except Exception as exc:
        pytest.skip(f"fake CUDA tensors are not available: {exc}")
    with mode:
        x = torch.empty(2, 3, 9, 7, device="cuda")
        args = dict(x=x, weight=torch.empty(4, 3, 3, 3, device="cuda"), bias=torch.empty(4, device="cuda"),
                    alpha_weight=torch.empty(10, 4, device="cuda", requires_grad=True), alpha_bias=None,
                    rows=LayerRows(torch.empty(2, dtype=torch.long, device="cuda"), None), stride=(1, 1),
                    padding=(1, 1), dilation=(1, 1), groups=1)
        fold = Affine(torch.empty(4, device="cuda"), torch.empty(4, device="cuda"), "silu")
        assert cb.BACKEND.unsupported("conv2d", **args, fold=fold) == []
        y = cb.BACKEND.conv2d(**args, fold=fold)
        assert y.shape == (2, 4, 9, 7) and y.requires_grad
        trainable = Affine(torch.empty(4, device="cuda", requires_grad=True), torch.empty(4, device="cuda"), "relu")
        assert "folded BatchNorm" in " ".join(cb.BACKEND.unsupported("conv2d", **args, fold=trainable))
    assert cb.ACT_CODES == {name: i for i, name in enumerate(wfold.ACT_NAMES)}
