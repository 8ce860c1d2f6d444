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
    if not wf_kernels.dispatch.INTERPRET:
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


@pytest.mark.parametrize("nc,rows", [(5, [4, 0, 4, 4, 2, 0]), (1000, [999, 3, 3]), (4, [1]), (3, [])])
def test_class_segments_and_class_grad_match_index_add(nc, rows):
    """The fixed grid over all classes (empty classes exit at once) equals index_add of the per-sample grads."""
    from wf_kernels import gates

    rows = torch.tensor(rows, dtype=torch.long, device=DEV)
    perm, starts = gates.segments(rows, nc)
    assert starts.shape == (nc + 1,) and starts[0] == 0 and starts[-1] == rows.numel()
    for r in range(nc):  # class r's samples, in sample order (stable sort)
        assert rows[perm[starts[r]:starts[r + 1]]].eq(r).all()
        assert torch.equal(perm[starts[r]:starts[r + 1]], torch.nonzero(rows == r).flatten())
    g = torch.Generator().manual_seed(nc)
    alpha = torch.randn(nc, 37, generator=g).to(DEV)
    grad = torch.randn(rows.numel(), 37, generator=g).to(DEV)
    s = torch.sigmoid(alpha)
    ref = torch.zeros_like(alpha).index_add_(0, rows, grad) * s * (1 - s)
    torch.testing.assert_close(gates.class_grad(grad, alpha, perm, starts), ref, rtol=1e-6, atol=1e-6)


def test_segments_are_built_once_per_forward_and_shared_by_layers(monkeypatch):
    """A 3-layer wrapped model on the triton backend sorts the batch's rows once, not once per layer."""
    import wfnet.rows as R

    calls = []
    real = R.Rows.segments

    def counting(self, *a, **k):
        calls.append(len(self._segments))
        return real(self, *a, **k)

    builds = []
    real_sort = torch.sort
    monkeypatch.setattr(R.Rows, "segments", counting)
    monkeypatch.setattr(R.torch, "sort", lambda *a, **k: builds.append(1) or real_sort(*a, **k))
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 4)).to(DEV)
    wf = wfnet.wrap(net, num_classes=4, targets=["0", "1", "2"])
    x = torch.randn(5, 6, device=DEV)
    with wfnet.use_backend("triton"):
        wf(x, forget=torch.tensor([3, 1, 3, 0, 2])).sum().backward()
    assert len(calls) == 6  # alpha_weight and alpha_bias of three layers asked...
    assert len(builds) == 1  # ...and the sort ran once
    assert all(p.grad is not None for p in wf.filter_parameters())


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


def test_autotune_prunes_configs_that_do_not_fit_shared_memory_or_registers(monkeypatch):
    """Of the eleven Hopper configs, three need 256-288 KB for fp32 operands (an H100 has 227 KB per block); bf16
    halves the tiles and keeps all. Register limits (measured by bench/aot_verify.py): full-precision fp32 keeps
    only configs with <= 32 accumulators per thread, TF32 <= 128; the NCHW implicit-GEMM conv <= 32 accumulators and
    <= 16 input-tile elements per thread; channels_last on sm_90 <= 64 accumulators and <= 32 weight-tile elements;
    unaligned operands (K, N, C_in or C_out not a multiple of 16) <= 32 accumulators and <= 8 input-tile elements.
    A batch bucket keys the tuning, so batches 160 and 250 share one tuning."""
    from wf_kernels import autotune as at

    monkeypatch.setattr(at, "smem_limit", lambda device: 232_448)
    monkeypatch.setattr(at, "CAPABILITY", (9, 0))
    fp32 = {"x_ptr": torch.empty(1, dtype=torch.float32)}
    bf16 = {"x_ptr": torch.empty(1, dtype=torch.bfloat16)}
    kept = at.prune_configs(at._HOPPER, fp32, INPUT_PRECISION="tf32")
    assert len(kept) == 8 and all(at.smem_bytes(c, 4) <= 232_448 for c in kept)
    ieee = at.prune_configs(at._HOPPER, fp32, INPUT_PRECISION="ieee")
    assert ieee and all(at.accumulators_per_thread(c) <= 32 for c in ieee)
    assert len(at.prune_configs(at._HOPPER, bf16, INPUT_PRECISION="ieee")) == 11
    tiles = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in cs]  # noqa: E731
    nchw = at.prune_configs(at._HOPPER, bf16, INPUT_PRECISION="ieee", C_INNER=False)
    assert tiles(nchw) == [(64, 64, 32, 4), (64, 64, 16, 4), (64, 32, 16, 4)]
    nhwc = at.prune_configs(at._HOPPER, bf16, INPUT_PRECISION="ieee", C_INNER=True)
    assert tiles(nhwc) == [(128, 128, 64, 8), (128, 64, 64, 4), (64, 64, 64, 4), (64, 64, 32, 4), (64, 64, 16, 4),
                           (64, 32, 16, 4)]
    for odd in ({"K": 37, "N": 64}, {"C_in": 3, "C_out": 64}, {"K": 64, "N": 50}):  # unaligned operands
        kept = at.prune_configs(at._HOPPER, dict(bf16, **odd), INPUT_PRECISION="ieee", C_INNER=True)
        assert tiles(kept) == [(64, 64, 16, 4), (64, 32, 16, 4)], odd
    assert len(at.prune_configs(at._HOPPER, dict(bf16, K=64, N=1152), INPUT_PRECISION="ieee")) == 11
    misaligned = {"x_ptr": torch.empty(9, dtype=torch.bfloat16)[1:]}  # a view 2 bytes into its storage
    assert tiles(at.prune_configs(at._HOPPER, misaligned)) == [(64, 64, 16, 4), (64, 32, 16, 4)]
    monkeypatch.setattr(at, "CAPABILITY", (8, 0))  # sm_80: channels_last convs at most 64 accumulators
    nhwc = at.prune_configs(at._AMPERE, bf16, INPUT_PRECISION="ieee", C_INNER=True)
    assert nhwc and all(at.accumulators_per_thread(c) <= 64 for c in nhwc)
    assert all(at.accumulators_per_thread(c) <= 128 for c in at._HOPPER + at._AMPERE)
    monkeypatch.setattr(at, "smem_limit", lambda device: 1_000)  # nothing fits: the smallest config, not none
    assert len(at.prune_configs(at._HOPPER, fp32)) == 1
    assert at.m_bucket(160 * 65) == at.m_bucket(250 * 65) == 16384 and at.m_bucket(1) == 64
