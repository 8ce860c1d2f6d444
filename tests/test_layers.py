"""WFConv2d / WFLinear: every Conv2d option against a per-sample masked-weight reference built from a plain
nn.Conv2d, low-precision inputs and CPU autocast against fp32, channels_last, the no-row path (bit for bit), which
parameters train, repr, gates, and bad input.
"""
import copy

import pytest
import torch
import torch.nn as nn

from wfnet import WFConv2d, WFLinear

# PyTorch warns that padding="same" with an even kernel pads a copy of the input: expected for these cases.
pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same'"), pytest.mark.usefixtures("one_thread")]




def randomise_gates(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.alpha_weight.copy_(torch.randn(layer.alpha_weight.shape, generator=g) * 2)
        if layer.alpha_bias is not None:
            layer.alpha_bias.copy_(torch.randn(layer.alpha_bias.shape, generator=g) * 2)
    return layer


def masked_reference(plain, layer, x, rows):
    """Run ``plain`` (the original nn.Conv2d / nn.Linear) per sample with its weights scaled by row r_n's gates."""
    outs = []
    for n, r in enumerate(rows.tolist()):
        m = copy.deepcopy(plain)
        with torch.no_grad():
            gw = torch.sigmoid(layer.alpha_weight[r].float()).to(m.weight.dtype)
            m.weight.mul_(gw.view((-1,) + (1,) * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(torch.sigmoid(layer.alpha_bias[r].float()).to(m.bias.dtype))
            outs.append(m(x[n:n + 1]))
    return torch.cat(outs)


CONV_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=(3, 2), padding=(1, 2), padding_mode="replicate"),
    dict(kernel_size=3, padding=2, padding_mode="circular", dilation=2),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=4, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding="valid", stride=2),
    dict(kernel_size=3, stride=(2, 1), padding=(0, 1), bias=False),
    dict(kernel_size=3, padding=1, groups=3, out_channels=6),
    dict(kernel_size=5, padding=2, groups=6, in_channels=6, out_channels=6),  # depthwise
    dict(kernel_size=1),
]


def _conv_kwargs(opts):
    kw = dict(in_channels=6, out_channels=9)
    kw.update(opts)
    return kw


@pytest.mark.parametrize("opts", CONV_OPTIONS, ids=[str(o) for o in CONV_OPTIONS])
def test_wfconv2d_every_option_matches_masked_reference(opts):
    torch.manual_seed(0)
    plain = nn.Conv2d(**_conv_kwargs(opts))
    layer = randomise_gates(WFConv2d.from_conv(copy.deepcopy(plain), num_classes=7))
    x = torch.randn(4, plain.in_channels, 9, 11)
    rows = torch.tensor([6, 0, 3, 6])
    out = layer(x, forget=rows)
    ref = masked_reference(plain, layer, x, rows)
    assert out.shape == plain(x).shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), plain(x))  # no row: the original layer, bit for bit
    # the constructor builds the same layer as from_conv
    built = WFConv2d(**_conv_kwargs(opts), num_classes=7)
    built.load_state_dict(layer.state_dict())
    torch.testing.assert_close(built(x, forget=rows), out, rtol=0, atol=0)


def test_wflinear_matches_masked_reference_for_token_inputs():
    torch.manual_seed(1)
    plain = nn.Linear(12, 7)
    layer = randomise_gates(WFLinear.from_linear(copy.deepcopy(plain), num_classes=5))
    for shape in ((3, 12), (3, 4, 12), (3, 2, 5, 12)):
        x = torch.randn(shape)
        rows = torch.tensor([4, 1, 4])
        out = layer(x, forget=rows)
        torch.testing.assert_close(out, masked_reference(plain, layer, x, rows), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x, forget=2), masked_reference(plain, layer, x, torch.tensor([2] * 3)))
        assert torch.equal(layer(x), plain(x))


def test_init_gates_and_gate_inspection():
    layer = WFConv2d(3, 4, 3, num_classes=6)
    assert layer.alpha_weight.shape == (6, 4) and layer.alpha_bias.shape == (6, 4)
    assert layer.alpha_weight.dtype == torch.float32
    assert torch.all(layer.alpha_weight == 3.0)
    torch.testing.assert_close(layer.gate(5), torch.full((4,), torch.sigmoid(torch.tensor(3.0)).item()))
    layer = randomise_gates(layer)
    torch.testing.assert_close(layer.gate(2, "bias"), torch.sigmoid(layer.alpha_bias[2]))
    with pytest.raises(ValueError, match=r"row 6\b.*num_classes=6"):
        layer.gate(6)
    nobias = WFLinear(3, 4, bias=False, num_classes=2, init=-1.0)
    assert nobias.alpha_bias is None and torch.all(nobias.alpha_weight == -1.0)
    with pytest.raises(ValueError, match="no bias gates"):
        nobias.gate(0, "bias")
    with pytest.raises(ValueError, match="num_classes"):
        WFLinear(3, 4, num_classes=0)


def test_only_alphas_require_grad_and_only_used_rows_get_gradient():
    conv = nn.Conv2d(3, 5, 3)
    layer = WFConv2d.from_conv(conv, num_classes=4)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # shared, same state-dict keys
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["alpha_weight", "alpha_bias"]
    assert set(layer.state_dict()) == {"weight", "bias", "alpha_weight", "alpha_bias"}
    layer(torch.randn(3, 3, 6, 6), forget=torch.tensor([1, 3, 1])).square().sum().backward()
    assert conv.weight.grad is None
    for g in (layer.alpha_weight.grad, layer.alpha_bias.grad):
        assert g[[0, 2]].abs().sum() == 0 and g[1].abs().sum() > 0 and g[3].abs().sum() > 0
    lin = WFLinear.from_linear(nn.Linear(4, 2, bias=False), num_classes=3)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["alpha_weight"]


def test_extra_repr_is_readable():
    conv = WFConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), num_classes=10)
    r = repr(conv)
    assert r.startswith("WFConv2d(3, 8, kernel_size=(3, 3)") and "padding=(1, 1)" in r
    assert "num_classes=10" in r and "gates=weight+bias" in r
    lin = repr(WFLinear(5, 6, bias=False, num_classes=3))
    assert lin == "WFLinear(in_features=5, out_features=6, bias=False, num_classes=3, gates=weight)"


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_low_precision_inputs_match_fp32(dtype, tol, kind):
    torch.manual_seed(2)
    if kind == "conv":
        ref_layer = randomise_gates(WFConv2d(8, 16, 3, padding=1, num_classes=5))
        x = torch.randn(3, 8, 7, 7)
    else:
        ref_layer = randomise_gates(WFLinear(16, 24, num_classes=5))
        x = torch.randn(3, 6, 16)
    rows = torch.tensor([0, 4, 2])
    ref = ref_layer(x, forget=rows)
    layer = copy.deepcopy(ref_layer).to(dtype)
    out = layer(x.to(dtype), forget=rows)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert layer.alpha_weight.grad is not None and torch.isfinite(layer.alpha_weight.grad.float()).all()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_cpu_autocast_bf16(kind):
    torch.manual_seed(3)
    if kind == "conv":
        layer = randomise_gates(WFConv2d(8, 16, 3, padding=1, num_classes=5))
        x = torch.randn(3, 8, 7, 7)
    else:
        layer = randomise_gates(WFLinear(16, 24, num_classes=5))
        x = torch.randn(3, 6, 16)
    rows = torch.tensor([1, 1, 3])
    ref = layer(x, forget=rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, forget=rows)
        plain = layer(x)
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16  # as autocast gives the plain layer
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.alpha_weight.grad.dtype == torch.float32 and layer.alpha_weight.grad[1].abs().sum() > 0


def test_channels_last_input():
    torch.manual_seed(4)
    layer = randomise_gates(WFConv2d(6, 10, 3, padding=1, num_classes=4))
    x = torch.randn(3, 6, 8, 8)
    rows = torch.tensor([3, 0, 1])
    ref = layer(x, forget=rows)
    out = layer(x.to(memory_format=torch.channels_last), forget=rows)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cl_layer = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl_layer(x.to(memory_format=torch.channels_last), forget=rows), ref, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bad_rows(kind):
    layer = WFConv2d(3, 4, 3, num_classes=5) if kind == "conv" else WFLinear(3, 4, num_classes=5)
    x = torch.randn(2, 3, 5, 5) if kind == "conv" else torch.randn(2, 3)
    for bad in (-1, 5, 100):
        for rows in (bad, torch.tensor([0, bad])):
            with pytest.raises(ValueError, match=rf"row {bad}\b.*num_classes=5"):
                layer(x, forget=rows)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        layer(x, forget=torch.tensor([0, 1, 2]))
    for rows in (torch.tensor([0.0, 1.0]), torch.tensor([True, False]), 2.0):
        with pytest.raises(TypeError):
            layer(x, forget=rows)
    with pytest.raises(ValueError, match="meta"):
        layer(x.to("meta"), forget=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="meta"):
        layer(x.to("meta"), forget=1)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_empty_batch(kind):
    layer = WFConv2d(3, 4, 3, padding=1, num_classes=5) if kind == "conv" else WFLinear(3, 4, num_classes=5)
    x = torch.randn(0, 3, 5, 5) if kind == "conv" else torch.randn(0, 7, 3)
    for rows in (torch.zeros(0, dtype=torch.long), 4):
        out = layer(x, forget=rows)
        assert out.shape == layer(x).shape and out.numel() == 0


def test_from_conv_and_from_linear_type_checks():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        WFConv2d.from_conv(nn.Linear(2, 3), num_classes=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        WFLinear.from_linear(nn.Conv2d(2, 3, 1), num_classes=2)
