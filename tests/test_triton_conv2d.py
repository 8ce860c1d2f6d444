"""The fused conv2d kernels of the "triton" backend (implicit GEMM and cuDNN + epilogue) against the torch backend.

Outputs and gradients (x, alpha_weight, alpha_bias, and weight / bias when trainable) over random small shapes under
TRITON_INTERPRET=1 on CPU: NCHW and channels_last, stride / padding / dilation, sizes that are not multiples of the
tile, batch 1, N_c = 1000, many samples per row, one row for all, fp32 and fp16; bf16 on the epilogue path (no tl.dot
there). The implicit GEMM in bf16 and larger shapes run in the `cuda` tests.
"""
import pytest
import torch

import wfnet
from tolerances import tf32, tolerance
from wfnet.ops import wf_conv2d

wf_kernels = pytest.importorskip("wf_kernels.ops")
from wf_kernels import dispatch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _close(actual, expected, dtype, what, tol=None):
    tol = tolerance(dtype, "conv2d", DEV) if tol is None else tol
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g} (dtype {dtype})"


def _rows(mode, b, nc, seed):
    g = torch.Generator().manual_seed(seed + 100)
    if mode == "one":
        return torch.full((b,), nc - 1, dtype=torch.long, device=DEV)
    if mode == "few":
        return torch.randint(0, min(nc, 2), (b,), generator=g).to(DEV)
    return torch.randint(0, nc, (b,), generator=g).to(DEV)


def check_conv(b, c_in, h, w, c_out, k, nc, dtype, path, stride=1, padding=0, dilation=1, groups=1,
               channels_last=False, rows_mode="random", bias=True, train_weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g) / (c_in * k * k / groups) ** 0.5
    bb = torch.randn(c_out, generator=g) if bias else None
    aw = torch.randn(nc, c_out, generator=g) * 2
    ab = torch.randn(nc, c_out, generator=g) * 2 if bias else None
    rows = _rows(rows_mode, b, nc, seed)
    grad = None

    def run(backend, dt):
        nonlocal grad
        xx = x.to(DEV, dt).requires_grad_(True)
        ww = weight.to(DEV, dt).requires_grad_(train_weight)
        bbb = bb.to(DEV, dt).requires_grad_(train_weight) if bias else None
        aww = aw.to(DEV).requires_grad_(True)
        abb = ab.to(DEV).requires_grad_(True) if bias else None
        out = wf_conv2d(xx, ww, bbb, aww, abb, rows, stride, padding, dilation, groups, backend=backend)
        if grad is None:
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
        leaves = [v for v in (xx, ww, bbb, aww, abb) if v is not None and v.requires_grad]
        return out, torch.autograd.grad(out, leaves, grad.to(out.dtype)), xx

    dispatch.force_path("conv2d", path)
    try:
        out, grads, xx = run("triton", dtype)
    finally:
        dispatch.force_path("conv2d", None)
    ref_out, ref_grads, _ = run("torch", torch.float32 if dtype != torch.float32 else dtype)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _close(out, ref_out, dtype, "output")
    names = ["x"] + (["weight"] + (["bias"] if bias else []) if train_weight else []) + ["alpha_weight"] + (
        ["alpha_bias"] if bias else [])
    assert len(grads) == len(names)
    for nm, a, e in zip(names, grads, ref_grads):
        _close(a, e, dtype, f"grad {nm}")
    return out, grads


# (B, C_in, H, W, C_out, k, N_c, dtype, stride, padding, dilation, channels_last, rows mode, bias, train_weight)
CASES = [
    (2, 3, 9, 8, 5, 3, 7, torch.float32, 1, 1, 1, False, "random", True, False),
    (1, 4, 11, 7, 70, 3, 1000, torch.float32, 2, 1, 1, True, "one", True, False),    # batch 1, N_c=1000, C_out>tile
    (5, 6, 7, 7, 9, 3, 3, torch.float32, 1, 2, 2, False, "few", True, False),        # dilation 2
    (3, 5, 10, 9, 12, 1, 4, torch.float32, 1, 0, 1, True, "random", False, False),   # 1x1, no bias
    (3, 13, 6, 5, 8, 3, 6, torch.float32, 2, 0, 1, False, "random", True, True),     # trainable weight, K > tile
    (4, 3, 8, 8, 16, 3, 5, torch.float16, 1, 1, 1, True, "few", True, False),
    (2, 8, 7, 9, 24, 5, 1000, torch.float16, 1, 2, 1, False, "random", True, True),
    (1, 2, 40, 37, 4, 3, 3, torch.float32, 1, 1, 1, False, "one", True, False),      # P split over programs
]


@pytest.mark.parametrize("path", ["implicit_gemm", "epilogue"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}x{c[2]}x{c[3]}O{c[4]}k{c[5]}nc{c[6]}-"
                                                   f"{str(c[7])[6:]}-s{c[8]}p{c[9]}d{c[10]}-{'cl' if c[11] else 'nchw'}")
def test_conv_matches_torch(case, path):
    b, c_in, h, w, c_out, k, nc, dtype, s, p, d, cl, mode, bias, train_w = case
    check_conv(b, c_in, h, w, c_out, k, nc, dtype, path, s, p, d, 1, cl, mode, bias, train_w, seed=len(str(case)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_bf16_epilogue_path(channels_last):
    check_conv(3, 4, 6, 7, 10, 3, 5, torch.bfloat16, "epilogue", padding=1, channels_last=channels_last, seed=5)


def test_depthwise_conv_takes_epilogue_path_with_reason():
    out, _ = check_conv(2, 6, 7, 7, 6, 3, 4, torch.float32, None, padding=1, groups=6, seed=9)
    x = torch.zeros(2, 6, 7, 7)
    path, reason = dispatch.conv_path(x, torch.zeros(6, 1, 3, 3), (1, 1), (1, 1), (1, 1), 6, False)
    assert path == "epilogue" and "groups=6" in reason
    assert dispatch.last_decisions["conv2d"] == (path, reason)
    dispatch.force_path("conv2d", "implicit_gemm")
    try:
        with pytest.raises(ValueError, match="groups"):
            dispatch.conv_path(x, torch.zeros(6, 1, 3, 3), (1, 1), (1, 1), (1, 1), 6, False)
    finally:
        dispatch.force_path("conv2d", None)


def test_default_conv_path_is_epilogue_until_measured():
    x, w = torch.zeros(2, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    path, reason = dispatch.conv_path(x, w, (1, 1), (1, 1), (1, 1), 1, False)
    assert path == "epilogue" and "no measurement" in reason
    key = dispatch.shape_key("conv2d", x.dtype, x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1, False)
    dispatch.TABLE.setdefault(dispatch.DEVICE_NAME, {})[key] = {
        "path": "implicit_gemm", "implicit_gemm_ms": 1.0, "epilogue_ms": 2.0}
    try:
        path, reason = dispatch.conv_path(x, w, (1, 1), (1, 1), (1, 1), 1, False)
        assert path == "implicit_gemm" and "measured" in reason
    finally:
        del dispatch.TABLE[dispatch.DEVICE_NAME][key]


def test_conv_backward_is_bitwise_reproducible():
    """No atomics anywhere: two backward passes with many samples per class row give identical bits."""
    args = dict(b=6, c_in=3, h=6, w=6, c_out=10, k=3, nc=2, dtype=torch.float32, path="epilogue", padding=1,
                rows_mode="few", seed=4)
    _, d1 = check_conv(**args)
    _, d2 = check_conv(**args)
    for x1, x2 in zip(d1, d2):
        assert torch.equal(x1, x2)


def test_wfconv2d_layer_with_triton_backend_and_padding_mode():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect").to(DEV)
    layer = wfnet.WFConv2d.from_conv(conv, num_classes=4)
    with torch.no_grad():
        layer.alpha_weight.normal_(0, 2)
        layer.alpha_bias.normal_(0, 2)
    x = torch.randn(2, 3, 6, 5, device=DEV)
    rows = torch.tensor([3, 1], device=DEV)
    res = {}
    for be in ("triton", "torch"):
        layer.zero_grad()
        with wfnet.use_backend(be):
            out = layer(x, forget=rows)
        out.square().sum().backward()
        res[be] = (out.detach(), layer.alpha_weight.grad.clone(), layer.alpha_bias.grad.clone())
    for a, e, nm in zip(res["triton"], res["torch"], ("out", "grad alpha_weight", "grad alpha_bias")):
        _close(a, e, torch.float32, nm)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,allow_tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, True),
                                              (torch.bfloat16, True)], ids=["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("path", ["implicit_gemm", "epilogue"])
@pytest.mark.parametrize("shape", [
    (64, 64, 32, 32, 128, 3, 1, 1, 1, True),     # VGG/ResNet CIFAR-like, channels_last
    (32, 128, 16, 16, 128, 3, 2, 1, 1, False),   # strided
    (16, 3, 224, 224, 64, 3, 1, 1, 1, False),    # VGG first layer at 224
    (8, 64, 28, 28, 64, 3, 1, 2, 2, True),       # dilated
    (5, 17, 13, 11, 33, 5, 1, 2, 1, False),      # odd sizes
])
def test_conv_cuda(dtype, allow_tf32, path, shape):
    """fp32 runs exact (tight tolerance) when cuDNN's TF32 flag is off; with it on (torch's default) both the kernel
    and the cuDNN reference run TF32."""
    b, c_in, h, w, c_out, k, s, p, d, cl = shape
    with tf32(allow_tf32):
        check_conv(b, c_in, h, w, c_out, k, 1000, dtype, path, s, p, d, 1, cl, "random", seed=1)
        check_conv(b, c_in, h, w, c_out, k, 10, dtype, path, s, p, d, 1, cl, "few", train_weight=True, seed=2)


@pytest.mark.parametrize("act", ["none", "relu6", "hardswish"])
def test_conv2d_forward_matches_its_reference(act):
    """The launcher ``conv2d.conv2d_forward`` (both paths, NCHW and channels_last) against ``conv2d.reference``."""
    from wf_kernels import conv2d

    g = torch.Generator().manual_seed(4)
    for b, ci, h, w_, co, k, s, p in ((1, 3, 5, 7, 4, 3, 1, 1), (2, 5, 9, 6, 7, 3, 2, 0), (3, 16, 4, 4, 9, 1, 1, 0)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(b, ci, h, w_, generator=g).to(DEV).contiguous(memory_format=fmt)
            wt = (torch.randn(co, ci, k, k, generator=g) / (ci * k * k) ** 0.5).to(DEV).contiguous(memory_format=fmt)
            gates, gb = torch.rand(b, co, generator=g).to(DEV), torch.randn(b, co, generator=g).to(DEV)
            ref = conv2d.reference(x, wt, gates, gb, (s, s), (p, p), (1, 1), 1, act)
            for path in ("implicit_gemm", "epilogue"):
                out, _ = conv2d.conv2d_forward(x, wt, gates, gb, (s, s), (p, p), (1, 1), 1, path, False, "ieee", act)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{path} {act} {fmt}")
