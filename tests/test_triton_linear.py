"""The fused linear (qkv) kernels of the "triton" backend against the torch backend: outputs and every gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); shapes are tiny and deliberately not multiples of the
64x64x32 interpreter tile. bf16 is tested here only through the epilogue path (the interpreter's tl.dot is wrong for
bf16); the fused GEMM in bf16 and larger shapes run in the `cuda` tests.
"""
import pytest
import torch

import wfnet
from tolerances import tf32, tolerance
from wfnet.backends import BackendUnavailableError
from wfnet.ops import wf_linear

wf_kernels = pytest.importorskip("wf_kernels.ops")
from wf_kernels import dispatch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _close(actual, expected, dtype, what, tol=None):
    tol = tolerance(dtype, "linear", DEV) if tol is None else tol
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g} (dtype {dtype})"


def _make(b, t, k, n, nc, dtype, bias=True, gate_bias=True, train_weight=False, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, k, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).requires_grad_(train_weight)
    bb = torch.randn(n, generator=g).to(device, dtype).requires_grad_(train_weight) if bias else None
    aw = (torch.randn(nc, n, generator=g) * 2).to(device).requires_grad_(True)
    ab = (torch.randn(nc, n, generator=g) * 2).to(device).requires_grad_(True) if bias and gate_bias else None
    return x, w, bb, aw, ab


def _run(backend, x, w, bb, aw, ab, rows, grad, ref_dtype=None):
    """Output and grads of every tensor that requires grad; ref_dtype upcasts the inputs (fp32 reference)."""
    leaves = [x, w, bb, aw, ab]
    if ref_dtype is not None:
        x, w, bb = (None if v is None else v.detach().to(ref_dtype).requires_grad_(v.requires_grad) for v in (x, w, bb))
        aw, ab = (None if v is None else v.detach().requires_grad_(True) for v in (aw, ab))
        leaves = [x, w, bb, aw, ab]
    out = wf_linear(x, w, bb, aw, ab, rows, backend=backend)
    need = [v for v in leaves if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, need, grad.to(out.dtype))
    return out, grads


def _rows(mode, b, nc, seed):
    g = torch.Generator().manual_seed(seed + 100)
    if mode == "one":
        return torch.full((b,), nc - 1, dtype=torch.long, device=DEV)
    if mode == "few":  # many samples per row -> atomic conflicts
        return torch.randint(0, min(nc, 2), (b,), generator=g).to(DEV)
    return torch.randint(0, nc, (b,), generator=g).to(DEV)


def check_linear(b, t, k, n, nc, dtype, rows_mode="random", bias=True, gate_bias=True, train_weight=False, seed=0,
                 path=None):
    x, w, bb, aw, ab = _make(b, t, k, n, nc, dtype, bias, gate_bias, train_weight, seed)
    rows = _rows(rows_mode, b, nc, seed)
    grad = torch.randn(b, t, n, generator=torch.Generator().manual_seed(seed + 7)).to(DEV)
    dispatch.force_path("linear", path)
    try:
        out, grads = _run("triton", x, w, bb, aw, ab, rows, grad)
    finally:
        dispatch.force_path("linear", None)
    ref_out, ref_grads = _run("torch", x, w, bb, aw, ab, rows, grad,
                              ref_dtype=None if dtype == torch.float32 else torch.float32)
    assert out.dtype == dtype
    _close(out, ref_out, dtype, "output")
    names = [nm for nm, v in zip("x w b alpha_weight alpha_bias".split(), (x, w, bb, aw, ab))
             if v is not None and v.requires_grad]
    for nm, a, e in zip(names, grads, ref_grads):
        _close(a, e, dtype, f"grad {nm}")
    return out, grads


# (B, T, K, N, N_c, dtype, rows mode, bias, gate_bias, train_weight, path)
CASES = [
    (2, 5, 20, 24, 7, torch.float32, "random", True, True, False, "gemm"),
    (1, 7, 33, 70, 3, torch.float32, "one", True, True, False, "gemm"),          # batch 1, N > tile
    (4, 9, 48, 144, 1000, torch.float32, "random", True, True, False, "gemm"),   # N_c = 1000, qkv-like N = 3K
    (6, 3, 16, 40, 2, torch.float32, "few", True, False, False, "gemm"),         # bias without gate logits
    (3, 1, 65, 17, 5, torch.float32, "random", False, False, False, "gemm"),     # 2-d input, no bias, K > tile
    (5, 4, 24, 30, 4, torch.float32, "random", True, True, True, "gemm"),        # trainable weight + bias
    (3, 13, 40, 96, 9, torch.float16, "random", True, True, False, "gemm"),
    (2, 5, 32, 48, 1000, torch.float16, "one", True, True, True, "gemm"),
    (3, 6, 24, 72, 6, torch.float32, "random", True, True, False, "epilogue"),
    (4, 5, 24, 40, 1000, torch.bfloat16, "few", True, True, False, None),        # bf16 -> epilogue path here
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}K{c[2]}N{c[3]}nc{c[4]}-{str(c[5])[6:]}-"
                                                   f"{c[6]}-{c[10]}")
def test_linear_matches_torch(case):
    b, t, k, n, nc, dtype, mode, bias, gate_bias, train_w, path = case
    check_linear(b, t, k, n, nc, dtype, mode, bias, gate_bias, train_w, seed=hash(case) % 1000, path=path)


def test_linear_2d_input_and_frozen_gates():
    """[B, F] input (one token per sample) with gates that need no grad: only grad x, no z saved."""
    x, w, bb, aw, ab = _make(5, 1, 20, 30, 4, torch.float32)
    x2 = x.detach().reshape(5, 20).requires_grad_(True)
    aw.requires_grad_(False)
    ab.requires_grad_(False)
    rows = torch.tensor([0, 3, 3, 1, 2], device=DEV)
    out = wf_linear(x2, w, bb, aw, ab, rows, backend="triton")
    ref = wf_linear(x2, w, bb, aw, ab, rows, backend="torch")
    assert out.shape == (5, 30)
    _close(out, ref, torch.float32, "output")
    g = torch.randn_like(out)
    _close(torch.autograd.grad(out, x2, g)[0], torch.autograd.grad(ref, x2, g)[0], torch.float32, "grad x")


def test_bf16_linear_under_interpreter_takes_epilogue_path():
    if not dispatch.INTERPRET:
        pytest.skip("interpreter-only routing")
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    path, reason = dispatch.linear_path((6, 4), w, torch.bfloat16)
    assert path == "epilogue" and "bf16" in reason
    dispatch.force_path("linear", "gemm")
    try:
        with pytest.raises(ValueError, match="bf16"):
            dispatch.linear_path((6, 4), w, torch.bfloat16)
    finally:
        dispatch.force_path("linear", None)


def test_backward_is_bitwise_reproducible():
    """No atomics anywhere (per-sample partials, then sorted class segments): identical bits run to run."""
    args = dict(b=12, t=6, k=20, n=40, nc=3, dtype=torch.float32, rows_mode="few", seed=3)
    _, det1 = check_linear(**args)
    _, det2 = check_linear(**args)
    for d1, d2 in zip(det1, det2):
        assert torch.equal(d1, d2)


def test_unsupported_reasons(monkeypatch):
    from wfnet.backends import triton as tb

    x, w, bb, aw, ab = _make(2, 3, 8, 6, 4, torch.float32)
    rows = torch.zeros(2, dtype=torch.long, device=DEV)
    args = dict(x=x, weight=w, bias=bb, alpha_weight=aw, alpha_bias=ab, rows=rows)
    assert tb.BACKEND.unsupported("linear", **args) == []
    r = tb.BACKEND.unsupported("linear", **{**args, "x": x.double()})
    assert any("float64" in s for s in r) and any("differs" in s for s in r)
    if DEV == "cpu":
        monkeypatch.setattr(tb, "INTERPRET", False)
        assert any("TRITON_INTERPRET" in s for s in tb.BACKEND.unsupported("linear", **args))
    with pytest.raises(BackendUnavailableError, match="float64"):
        wf_linear(x.double(), w.double(), bb.double(), aw, ab, rows, backend="triton")


def test_wflinear_layer_uses_triton_backend():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 36).to(DEV)
    layer = wfnet.WFLinear.from_linear(lin, num_classes=5)
    with torch.no_grad():
        layer.alpha_weight.normal_(0, 2)
    x = torch.randn(3, 7, 12, device=DEV)
    rows = torch.tensor([4, 0, 4], device=DEV)
    with wfnet.use_backend("triton"):
        out = layer(x, forget=rows)
        out.sum().backward()
    g_tr = layer.alpha_weight.grad.clone()
    layer.alpha_weight.grad = None
    with wfnet.use_backend("torch"):
        ref = layer(x, forget=rows)
        ref.sum().backward()
    _close(out, ref, torch.float32, "layer output")
    _close(g_tr, layer.alpha_weight.grad, torch.float32, "layer grad alpha_weight")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,allow_tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False),
                                              (torch.bfloat16, False)], ids=["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(256, 65, 192, 576, 10), (64, 197, 384, 1152, 1000), (3, 17, 100, 300, 1)])
@pytest.mark.parametrize("path", ["gemm", "epilogue"])
def test_linear_cuda(dtype, allow_tf32, shape, path):
    """fp32 runs exact (tight tolerance) unless torch allows TF32 for matmuls; then both sides run TF32."""
    b, t, k, n, nc = shape
    with tf32(allow_tf32):
        check_linear(b, t, k, n, nc, dtype, "random", seed=1, path=path)
        check_linear(b, t, k, n, nc, dtype, "few", train_weight=True, seed=2, path=path)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_linear_forward_matches_its_reference(act):
    """The launcher ``linear.linear_forward`` (both paths) against ``linear.reference`` on odd fp32 shapes."""
    from wf_kernels import linear

    g = torch.Generator().manual_seed(3)
    for b, t, k, n in ((1, 1, 5, 3), (3, 7, 37, 50), (2, 65, 16, 70)):
        x = torch.randn(b, t, k, generator=g).to(DEV)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV)
        gates, gb = torch.rand(b, n, generator=g).to(DEV), torch.randn(b, n, generator=g).to(DEV)
        ref = linear.reference(x, w, gates, gb, act)
        for path in ("gemm", "epilogue"):
            out, z = linear.linear_forward(x, w, gates, gb, path, True, "ieee", act)
            _close(out, ref, torch.float32, f"{path} {act} {(b, t, k, n)}")
            _close(z, x @ w.t(), torch.float32, f"z {path}")
