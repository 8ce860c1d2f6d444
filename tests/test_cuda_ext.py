"""Tests of the compiled "cuda" backend (csrc/ -> wfnet._C, python/wfnet/backends/cuda.py).

CPU side (run everywhere): the extension imports and registers its ops whenever the build was expected (CUDA
toolkit + CUDA-enabled torch + WFNET_SKIP_CUDA_BUILD unset); backend="cuda" explains why it cannot run (CPU tensors,
dtype, missing build); the fake kernels give the right shapes, dtypes and memory formats on meta / fake-CUDA tensors;
the autograd glue maps the backward op's outputs to the right inputs.

GPU side (``pytest -m cuda``): outputs and gradients against the "torch" backend (tolerance: at most twice the torch
backend's own low-precision error against a float64 reference, plus a small atol) over random shapes, every dtype,
NCHW and channels_last, batch 1, N_c = 1000, trainable weight / bias, deterministic mode; torch.library.opcheck;
torch.compile; 64-bit indexing; the C++ input checks.
"""
from __future__ import annotations

import importlib
import os
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch

from wfnet.rows import LayerRows

import wfnet
import wfnet.backends as backends
from wfnet import ops
from wfnet.backends import BackendUnavailableError

OP_NAMES = ("cuda_gate_epilogue", "cuda_gate_epilogue_", "cuda_gate_backward")


def _segments(rows, num_classes):
    """The batch's class segments (perm, starts) as wfnet.rows.Rows.segments makes them."""
    from wfnet.rows import Rows
    return Rows(rows, num_classes, rows.shape[0]).segments(rows.device)


def _build_expected() -> tuple[bool, str]:
    """Mirror setup.py: was `pip install --no-build-isolation -e .` supposed to compile wfnet._C here?"""
    if os.environ.get("WFNET_SKIP_CUDA_BUILD", "0") == "1":
        return False, "WFNET_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if not any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes):
        return False, "no CUDA toolkit at CUDA_HOME / CUDA_PATH / /usr/local/cuda"
    return True, ""


def _cuda_backend_module():
    try:
        return importlib.import_module("wfnet.backends.cuda")
    except ImportError as exc:
        pytest.skip(f"wfnet._C is not built here: {exc}")


def _extension_built() -> bool:
    try:
        importlib.import_module("wfnet.backends.cuda")
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------------------------------
# CPU side

def test_extension_imports_and_registers_ops_when_build_expected():
    expected, why = _build_expected()
    if not expected:
        pytest.skip(f"the CUDA extension is not built in this environment: {why}")
    import wfnet._C  # noqa: F401  (must not fail: setup.py compiled it)

    for name in OP_NAMES:
        assert hasattr(torch.ops.wfnet, name), f"torch.ops.wfnet.{name} is not registered"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wfnet::{name}", "CUDA"), name
    schema = str(torch.ops.wfnet.cuda_gate_epilogue.default._schema)
    assert "Tensor? alpha_bias" in schema and "int channel_dim" in schema
    assert "Tensor(a!) z" in str(torch.ops.wfnet.cuda_gate_epilogue_.default._schema)
    assert "cuda" in backends.available_backends() and backends.available_backends()["cuda"] is None


def _conv_args(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g).to(device, dtype)
    w = torch.randn(4, 3, 3, 3, generator=g).to(device, dtype)
    b = torch.randn(4, generator=g).to(device, dtype)
    aw = torch.randn(7, 4, generator=g).to(device)
    ab = torch.randn(7, 4, generator=g).to(device)
    rows = torch.tensor([1, 6], device=device)
    return x, w, b, aw, ab, rows


def test_cuda_backend_on_cpu_tensors_raises_with_reason():
    x, w, b, aw, ab, rows = _conv_args()
    with pytest.raises(BackendUnavailableError) as conv_err:
        ops.wf_conv2d(x, w, b, aw, ab, rows, padding=1, backend="cuda")
    xl = torch.randn(2, 5, 3)
    with pytest.raises(BackendUnavailableError) as lin_err:
        ops.wf_linear(xl, w.reshape(4, -1)[:, :3].contiguous(), b, aw, ab, rows, backend="cuda")
    for err in (conv_err, lin_err):
        msg = str(err.value)
        assert "backend 'cuda' cannot run" in msg
        if _extension_built():
            assert "needs CUDA tensors" in msg and "cpu" in msg
        else:  # the reason is the missing build, with the command that fixes it
            assert "pip install --no-build-isolation -e ." in msg


def test_missing_extension_error_says_how_to_build(monkeypatch):
    # Simulate an install without the compiled module; the registry must report the build instructions.
    monkeypatch.setitem(sys.modules, "wfnet._C", None)
    monkeypatch.delitem(sys.modules, "wfnet.backends.cuda", raising=False)
    monkeypatch.delattr(wfnet, "_C", raising=False)
    monkeypatch.delattr(backends, "cuda", raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_import_errors", {})
    with pytest.raises(ImportError) as exc:
        importlib.import_module("wfnet.backends.cuda")
    assert "pip install --no-build-isolation -e ." in exc.value.wfnet_hint
    assert "WFNET_SKIP_CUDA_BUILD" in exc.value.wfnet_hint
    monkeypatch.delitem(sys.modules, "wfnet.backends.cuda", raising=False)
    x, w, b, aw, ab, rows = _conv_args()
    with pytest.raises(BackendUnavailableError, match="failed to import") as err:
        ops.wf_conv2d(x, w, b, aw, ab, rows, backend="cuda")
    assert "pip install --no-build-isolation -e ." in str(err.value)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["nchw", "channels_last", "linear3d", "linear2d"])
def test_fake_epilogue_shapes_on_meta(dtype, case):
    _cuda_backend_module()
    if case in ("nchw", "channels_last"):
        z = _meta(3, 5, 7, 2, dtype=dtype)
        if case == "channels_last":
            z = z.to(memory_format=torch.channels_last)
        channel_dim, c = 1, 5
    else:
        z = _meta(3, 4, 6, dtype=dtype) if case == "linear3d" else _meta(3, 6, dtype=dtype)
        channel_dim, c = -1, 6
    rows, aw, ab, b = _meta(3, dtype=torch.long), _meta(1000, c), _meta(1000, c), _meta(c, dtype=dtype)
    out = torch.ops.wfnet.cuda_gate_epilogue(z, rows, aw, ab, b, channel_dim)
    assert out.shape == z.shape and out.dtype == dtype and out.device.type == "meta"
    assert out.stride() == z.stride()  # memory format kept (channels_last stays channels_last)
    assert torch.ops.wfnet.cuda_gate_epilogue_(z, rows, aw, None, b, channel_dim) is None


@pytest.mark.parametrize("flags", [(True, True, True, True), (True, False, False, False), (False, True, False, True),
                                   (False, False, True, False)])
def test_fake_backward_shapes_on_meta(flags):
    _cuda_backend_module()
    need_z, need_aw, need_ab, need_b = flags
    go = _meta(2, 6, 4, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    rows, aw, ab, b = _meta(2, dtype=torch.long), _meta(10, 6), _meta(10, 6), _meta(6, dtype=torch.bfloat16)
    gz, gaw, gab, gb = torch.ops.wfnet.cuda_gate_backward(go, go, rows, aw, ab, b, 1, need_z, need_aw, need_ab,
                                                          need_b, False)
    assert (gz.shape, gz.dtype) == ((go.shape if need_z else (0,)), torch.bfloat16)
    if need_z:
        assert gz.stride() == go.stride()
    assert (gaw.shape, gaw.dtype) == ((aw.shape if need_aw else (0,)), torch.float32)
    assert (gab.shape, gab.dtype) == ((aw.shape if need_ab else (0,)), torch.float32)
    assert (gb.shape, gb.dtype) == (((6,) if need_b else (0,)), torch.bfloat16)


def _fake_cuda_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device="cuda")
    except Exception as exc:  # e.g. a CPU-only torch cannot even fake CUDA tensors
        pytest.skip(f"fake CUDA tensors are not available: {exc}")
    return mode


@pytest.mark.parametrize("requires_grad", [False, True])
def test_backend_glue_on_fake_cuda_tensors(requires_grad):
    cb = _cuda_backend_module()
    with _fake_cuda_mode():
        x = torch.empty(2, 3, 9, 7, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        w = torch.empty(4, 3, 3, 3, device="cuda", dtype=torch.float16)
        b = torch.empty(4, device="cuda", dtype=torch.float32)  # cast to the activation dtype by the backend
        aw = torch.empty(1000, 4, device="cuda", requires_grad=requires_grad)
        ab = torch.empty(1000, 4, device="cuda", dtype=torch.float16)  # gate logits are converted to fp32
        rows = torch.empty(2, dtype=torch.long, device="cuda")
        # backends take rows already validated and bound to the input (wfnet.rows.LayerRows)
        args = dict(x=x, weight=w, bias=b, alpha_weight=aw, alpha_bias=ab, rows=LayerRows(rows, None),
                    stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=1)
        assert cb.BACKEND.unsupported("conv2d", **args) == []
        y = cb.BACKEND.conv2d(**args)
        assert y.shape == (2, 4, 5, 7) and y.dtype == torch.float16 and y.device.type == "cuda"
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.requires_grad == requires_grad  # no grad needed -> the in-place epilogue, no autograd node
        xl = torch.empty(3, 5, 8, device="cuda", dtype=torch.bfloat16)
        wl = torch.empty(6, 8, device="cuda", dtype=torch.bfloat16)
        yl = cb.BACKEND.linear(xl, wl, None, aw[:, :1].expand(1000, 6), None, LayerRows(rows.new_empty(3), None))
        assert yl.shape == (3, 5, 6) and yl.dtype == torch.bfloat16


def test_unsupported_reasons_on_fake_cuda_tensors():
    cb = _cuda_backend_module()
    with _fake_cuda_mode():
        x = torch.empty(2, 8, device="cuda", dtype=torch.float64)
        w = torch.empty(3, 8, device="cuda", dtype=torch.float32)
        aw = torch.empty(4, 3, device="cuda", dtype=torch.long)
        reasons = cb.BACKEND.unsupported("linear", x=x, weight=w, bias=None, alpha_weight=aw, alpha_bias=None,
                                         rows=torch.empty(2, dtype=torch.long, device="cuda"))
    text = " | ".join(reasons)
    assert len(reasons) == 3, reasons
    assert "float64 is not supported" in text and "differs from the input dtype" in text
    assert "alpha_weight must be a floating-point tensor" in text


@pytest.mark.parametrize("needs", [(True, False, True, True, True, False), (False, False, False, True, False, False),
                                   (True, False, False, False, False, False)])
def test_autograd_glue_maps_gradients(needs):
    cb = _cuda_backend_module()
    need_z, _, need_aw, need_ab, need_b, _ = needs
    with _fake_cuda_mode():
        go = torch.empty(2, 4, 5, 5, device="cuda", dtype=torch.float16)  # NCHW grad for a channels_last z
        z = torch.empty(2, 4, 5, 5, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        aw = torch.empty(10, 4, device="cuda")
        ab = torch.empty(10, 4, device="cuda")
        b = torch.empty(4, device="cuda", dtype=torch.float16)
        rows = torch.empty(2, dtype=torch.long, device="cuda")
        perm, starts = torch.empty(2, dtype=torch.long, device="cuda"), torch.empty(11, dtype=torch.long,
                                                                                       device="cuda")
        ctx = SimpleNamespace(saved_tensors=(z if need_aw else None, rows, aw, ab, b, None, None, perm, starts),
                              needs_input_grad=needs, channel_dim=1, memory_format=torch.channels_last, act=0)
        grads = cb._backward(ctx, go)
    assert len(grads) == 6 and grads[1] is None and grads[5] is None
    assert (grads[0] is not None) == need_z and (grads[2] is not None) == need_aw
    assert (grads[3] is not None) == need_ab and (grads[4] is not None) == need_b
    if need_z:
        assert grads[0].shape == z.shape and grads[0].is_contiguous(memory_format=torch.channels_last)
    if need_aw:
        assert grads[2].shape == aw.shape and grads[2].dtype == torch.float32
    if need_b:
        assert grads[4].shape == (4,) and grads[4].dtype == torch.float16


# ------------------------------------------------------------------------------------------------------------------
# GPU side: everything below needs a CUDA device and the built extension (pytest -m cuda).

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _assert_close_to_ref(name, got, torch_lowp, ref64, atol):
    """got's error against the float64 reference must be at most twice the torch backend's own, plus atol."""
    assert got.shape == ref64.shape, name
    assert got.dtype == torch_lowp.dtype, name
    scale = ref64.abs().max().item() + 1e-6
    err = (got.double() - ref64).abs().max().item()
    err_torch = (torch_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + atol * scale, f"{name}: error {err:.3g} vs torch backend {err_torch:.3g}"


def _run(op, backend, tensors, grads_of, grad_out, **kw):
    leaves = {k: (v.detach().clone().requires_grad_(k in grads_of) if v is not None else None)
              for k, v in tensors.items()}
    if op == "conv2d":
        out = ops.wf_conv2d(leaves["x"], leaves["weight"], leaves["bias"], leaves["alpha_weight"],
                            leaves["alpha_bias"], leaves["rows"], backend=backend, **kw)
    else:
        out = ops.wf_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["alpha_weight"],
                            leaves["alpha_bias"], leaves["rows"], backend=backend)
    out.backward(grad_out.to(out.dtype))
    return out, {k: leaves[k].grad for k in grads_of}


def _compare(op, tensors, grads_of, grad_out, dtype, **kw):
    as64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in tensors.items()}
    out64, g64 = _run(op, "torch", as64, grads_of, grad_out.double(), **kw)
    out_t, g_t = _run(op, "torch", tensors, grads_of, grad_out, **kw)
    out_c, g_c = _run(op, "cuda", tensors, grads_of, grad_out, **kw)
    _assert_close_to_ref("out", out_c, out_t, out64, TOL[dtype])
    if tensors["x"].dim() == 4:
        assert out_c.is_contiguous(memory_format=torch.channels_last) == out_t.is_contiguous(
            memory_format=torch.channels_last)
    for k in grads_of:
        assert g_c[k] is not None, f"no gradient for {k}"
        assert g_c[k].dtype == g_t[k].dtype, k
        _assert_close_to_ref(f"grad {k}", g_c[k], g_t[k], g64[k].to(torch.float64), TOL[dtype])
    return g_c


def _rng(*key):
    import numpy as np

    seed = zlib.crc32(repr(key).encode())  # stable across processes, unlike hash()
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _conv_case(rng, dtype, channels_last, num_classes, batch=None):
    b = batch or int(rng.integers(1, 6))
    cin, cout = int(rng.integers(1, 9)), int(rng.integers(1, 40))
    h, w = int(rng.integers(3, 20)), int(rng.integers(3, 20))
    k = int(rng.choice([1, 3]))
    dev = "cuda"
    x = torch.randn(b, cin, h, w, device=dev, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    tensors = dict(x=x, weight=torch.randn(cout, cin, k, k, device=dev, dtype=dtype) / (cin * k * k) ** 0.5,
                   bias=torch.randn(cout, device=dev, dtype=dtype),
                   alpha_weight=torch.randn(num_classes, cout, device=dev) * 2,
                   alpha_bias=torch.randn(num_classes, cout, device=dev) * 2,
                   rows=torch.randint(0, num_classes, (b,), device=dev))
    kw = dict(stride=int(rng.choice([1, 2])), padding=k // 2)
    return tensors, kw


cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("num_classes", [1, 10, 1000])
def test_conv2d_matches_torch_backend(dtype, channels_last, num_classes):
    _cuda_backend_module()
    rng = _rng("conv", dtype, channels_last, num_classes)
    for trial in range(4):
        tensors, kw = _conv_case(rng, dtype, channels_last, num_classes, batch=1 if trial == 0 else None)
        z_shape = torch.nn.functional.conv2d(tensors["x"], tensors["weight"], None, kw["stride"], kw["padding"]).shape
        grad_out = torch.randn(z_shape, device="cuda")
        _compare("conv2d", tensors, ("x", "alpha_weight", "alpha_bias"), grad_out, dtype, **kw)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 33), (4, 197, 96), (3, 2, 5, 40)])
@pytest.mark.parametrize("num_classes", [1, 1000])
def test_linear_matches_torch_backend(dtype, shape, num_classes):
    _cuda_backend_module()
    _rng("linear", dtype, shape, num_classes)
    f_in, f_out = shape[-1], 3 * shape[-1] + 1
    tensors = dict(x=torch.randn(shape, device="cuda", dtype=dtype),
                   weight=torch.randn(f_out, f_in, device="cuda", dtype=dtype) / f_in ** 0.5,
                   bias=torch.randn(f_out, device="cuda", dtype=dtype),
                   alpha_weight=torch.randn(num_classes, f_out, device="cuda") * 2,
                   alpha_bias=torch.randn(num_classes, f_out, device="cuda") * 2,
                   rows=torch.randint(0, num_classes, (shape[0],), device="cuda"))
    grad_out = torch.randn(shape[:-1] + (f_out,), device="cuda")
    _compare("linear", tensors, ("x", "alpha_weight", "alpha_bias"), grad_out, dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated_bias", [True, False])
def test_trainable_weight_and_bias(dtype, gated_bias):
    _cuda_backend_module()
    tensors, kw = _conv_case(_rng("trainable", dtype, gated_bias), dtype, False, 10, batch=4)
    if not gated_bias:
        tensors["alpha_bias"] = None  # a bias without gates is added as is
    z_shape = torch.nn.functional.conv2d(tensors["x"], tensors["weight"], None, kw["stride"], kw["padding"]).shape
    grads = ("x", "weight", "bias", "alpha_weight") + (("alpha_bias",) if gated_bias else ())
    _compare("conv2d", tensors, grads, torch.randn(z_shape, device="cuda"), dtype, **kw)
    lin = dict(x=torch.randn(3, 11, 16, device="cuda", dtype=dtype),
               weight=torch.randn(24, 16, device="cuda", dtype=dtype) / 4,
               bias=torch.randn(24, device="cuda", dtype=dtype),
               alpha_weight=torch.randn(10, 24, device="cuda"),
               alpha_bias=torch.randn(10, 24, device="cuda") if gated_bias else None,
               rows=torch.tensor([3, 3, 9], device="cuda"))
    _compare("linear", lin, grads, torch.randn(3, 11, 24, device="cuda"), dtype)


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic_mode_is_bitwise_reproducible(channels_last):
    _cuda_backend_module()
    # Many samples share few rows, so the class-row reduction really has to combine samples.
    tensors, kw = _conv_case(_rng("det", channels_last), torch.float32, channels_last, 3, batch=64)
    z_shape = torch.nn.functional.conv2d(tensors["x"], tensors["weight"], None, kw["stride"], kw["padding"]).shape
    grad_out = torch.randn(z_shape, device="cuda")
    # (a trainable bias would force the buffered path in both modes; it is covered by test_trainable_weight_and_bias)
    grads = ("x", "alpha_weight", "alpha_bias")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = _compare("conv2d", tensors, grads, grad_out, torch.float32, **kw)
        second = _run("conv2d", "cuda", tensors, grads, grad_out, **kw)[1]
    finally:
        torch.use_deterministic_algorithms(was)
    for k in grads:
        assert torch.equal(first[k], second[k]), f"{k} differs between two deterministic runs"
    atomic = _run("conv2d", "cuda", tensors, grads, grad_out, **kw)[1]  # default: atomics
    for k in grads[1:]:
        torch.testing.assert_close(atomic[k], first[k], rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inplace_inference_path_matches_autograd_path(dtype):
    _cuda_backend_module()
    tensors, kw = _conv_case(_rng("inplace", dtype), dtype, True, 100, batch=6)
    args = [tensors[k] for k in ("x", "weight", "bias", "alpha_weight", "alpha_bias", "rows")]
    with torch.no_grad():
        fast = ops.wf_conv2d(*args, backend="cuda", **kw)
    assert fast.grad_fn is None
    aw = tensors["alpha_weight"].clone().requires_grad_(True)
    slow = ops.wf_conv2d(*args[:3], aw, *args[4:], backend="cuda", **kw)
    assert slow.grad_fn is not None
    assert torch.equal(fast, slow.detach())


def _epilogue_formula(z, rows, aw, ab, b, channel_dim):
    """The epilogue written out in float64 with broadcasting, independent of both backends."""
    shape = [1] * z.dim()
    shape[0], shape[channel_dim] = z.shape[0], z.shape[channel_dim]
    gate = torch.sigmoid(aw.double())[rows].view(shape)
    out = gate * z.double()
    if b is not None:
        gb = torch.ones_like(gate) if ab is None else torch.sigmoid(ab.double())[rows].view(shape)
        out = out + gb * b.double().view([-1 if d == channel_dim % z.dim() else 1 for d in range(z.dim())])
    return out


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    ((3, 16, 8, 8), 1, None),                    # NCHW, spatial % 8 == 0: vectorised
    ((3, 16, 5, 7), 1, None),                    # NCHW, odd spatial: scalar
    ((3, 16, 8, 8), 1, torch.channels_last),     # NHWC, channels % 8 == 0: vectorised
    ((3, 13, 8, 8), 1, torch.channels_last),     # NHWC, odd channels: scalar
    ((4, 9, 64), -1, None),                      # tokens, features % 8 == 0: vectorised
    ((4, 9, 30), -1, None),                      # tokens, features % 8 != 0 (fp32: % 4 != 0): scalar
    ((1, 24), -1, None),                         # plain [B, C]
])
@pytest.mark.parametrize("bias_kind", ["gated", "ungated", "none"])
def test_epilogue_op_matches_formula(dtype, case, bias_kind):
    _cuda_backend_module()
    shape, channel_dim, fmt = case
    _rng("epilogue", dtype, case, bias_kind)
    z = torch.randn(shape, device="cuda", dtype=dtype)
    if fmt is not None:
        z = z.to(memory_format=fmt)
    c = shape[channel_dim]
    rows = torch.randint(0, 50, (shape[0],), device="cuda")
    aw, ab = torch.randn(50, c, device="cuda") * 3, torch.randn(50, c, device="cuda") * 3
    b = None if bias_kind == "none" else torch.randn(c, device="cuda", dtype=dtype)
    ab = ab if bias_kind == "gated" else None
    expected = _epilogue_formula(z, rows, aw, ab, b, channel_dim)
    out = torch.ops.wfnet.cuda_gate_epilogue(z, rows, aw, ab, b, channel_dim)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert out.stride() == z.stride()
    inplace = z.clone()
    torch.ops.wfnet.cuda_gate_epilogue_(inplace, rows, aw, ab, b, channel_dim)
    assert torch.equal(inplace, out)
    # The backward op against the same formula: grad_z = grad_out * gate, class-row sums of grad_out * z.
    go = torch.randn_like(z)
    for det in (False, True):
        seg = _segments(rows, aw.shape[0]) if det else (None, None)  # the batch's class segments: deterministic sums
        gz, gaw, gab, gb = torch.ops.wfnet.cuda_gate_backward(go, z, rows, aw, ab, b, channel_dim, True, True,
                                                              ab is not None, b is not None, det, None, None, 0, *seg)
        torch.testing.assert_close(gz.double(), _epilogue_formula(go, rows, aw, None, None, channel_dim),
                                   rtol=tol, atol=tol)
        dims = [d for d in range(z.dim()) if d not in (0, channel_dim % z.dim())]
        s_w = torch.sigmoid(aw.double())
        per_sample = (go.double() * z.double()).sum(dim=dims) if dims else go.double() * z.double()
        ref_aw = torch.zeros_like(s_w).index_add_(0, rows, per_sample) * s_w * (1 - s_w)
        torch.testing.assert_close(gaw.double(), ref_aw, rtol=1e-4, atol=1e-4)
        sum_go = go.double().sum(dim=dims) if dims else go.double()
        if ab is not None:
            s_b = torch.sigmoid(ab.double())
            ref_ab = torch.zeros_like(s_b).index_add_(0, rows, sum_go * b.double()) * s_b * (1 - s_b)
            torch.testing.assert_close(gab.double(), ref_ab, rtol=1e-4, atol=1e-4)
        else:
            assert gab.numel() == 0
        if b is not None:
            gate_b = torch.ones_like(sum_go) if ab is None else torch.sigmoid(ab.double())[rows]
            torch.testing.assert_close(gb.double(), (gate_b * sum_go).sum(0), rtol=tol, atol=tol * 10)
            assert gb.dtype == dtype


def _opcheck_cases():
    dev = "cuda"
    z4 = torch.randn(3, 5, 4, 6, device=dev)
    cases = []
    for z, cdim in ((z4, 1), (z4.to(memory_format=torch.channels_last), 1), (torch.randn(2, 7, 9, device=dev), -1)):
        c = z.shape[cdim]
        cases.append((z, torch.randint(0, 4, (z.shape[0],), device=dev), torch.randn(4, c, device=dev),
                      torch.randn(4, c, device=dev), torch.randn(c, device=dev), cdim))
    return cases


@cuda
def test_opcheck():
    _cuda_backend_module()
    for z, rows, aw, ab, b, cdim in _opcheck_cases():
        args = (z.requires_grad_(True), rows, aw.requires_grad_(True), ab.requires_grad_(True),
                b.requires_grad_(True), cdim)
        torch.library.opcheck(torch.ops.wfnet.cuda_gate_epilogue.default, args)
        torch.library.opcheck(torch.ops.wfnet.cuda_gate_epilogue_.default,
                              tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        go = torch.randn_like(z)
        for det in (False, True):
            seg = _segments(rows, aw.shape[0]) if det else (None, None)
            torch.library.opcheck(torch.ops.wfnet.cuda_gate_backward.default,
                                  (go, z.detach(), rows, aw.detach(), ab.detach(), b.detach(), cdim, True, True,
                                   True, True, det, None, None, 0, *seg))
        with pytest.raises(RuntimeError, match="class segments"):  # deterministic sums need the batch's segments
            torch.ops.wfnet.cuda_gate_backward(go, z.detach(), rows, aw.detach(), ab.detach(), b.detach(), cdim,
                                               False, True, True, False, True)
        perm, starts = _segments(rows, aw.shape[0])
        with pytest.raises(RuntimeError, match="starts must be a contiguous int64 tensor"):
            torch.ops.wfnet.cuda_gate_backward(go, z.detach(), rows, aw.detach(), ab.detach(), b.detach(), cdim,
                                               False, True, True, False, True, None, None, 0, perm, starts[:-1])


@cuda
def test_torch_compile_traces_forward_and_backward():
    _cuda_backend_module()
    tensors, kw = _conv_case(_rng("compile"), torch.float32, False, 10, batch=4)
    t = {k: v.detach().clone().requires_grad_(k == "alpha_weight") for k, v in tensors.items()}

    def f(x, backend):
        return ops.wf_conv2d(x, t["weight"], t["bias"], t["alpha_weight"], t["alpha_bias"], t["rows"],
                             backend=backend, **kw)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(t["x"], "cuda")
    out.square().sum().backward()
    got = t["alpha_weight"].grad.clone()
    t["alpha_weight"].grad = None
    ref = f(t["x"], "torch")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, t["alpha_weight"].grad, rtol=1e-4, atol=1e-4)


@cuda
def test_cpp_input_checks_have_clear_messages():
    _cuda_backend_module()
    z = torch.randn(2, 4, 3, 3, device="cuda")
    rows = torch.tensor([0, 1], device="cuda")
    aw = torch.randn(5, 4, device="cuda")
    op = torch.ops.wfnet.cuda_gate_epilogue
    with pytest.raises(RuntimeError, match="rows must be int64"):
        op(z, rows.int(), aw, None, None, 1)
    with pytest.raises(RuntimeError, match=r"rows must have shape \[2\]"):
        op(z, rows[:1], aw, None, None, 1)
    with pytest.raises(RuntimeError, match="alpha_weight must have shape"):
        op(z, rows, aw[:, :3].contiguous(), None, None, 1)
    with pytest.raises(RuntimeError, match="alpha_weight .* must be float32"):
        op(z, rows, aw.half(), None, None, 1)
    with pytest.raises(RuntimeError, match="activations must be float32, float16 or bfloat16"):
        op(z.double(), rows, aw, None, None, 1)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(z.transpose(2, 3), rows, aw, None, None, 1)
    with pytest.raises(RuntimeError, match="expected CUDA tensors, got activations on cpu"):
        op(z.cpu(), rows, aw, None, None, 1)  # (all-CPU calls are refused by the dispatcher: no CPU kernel)
    with pytest.raises(RuntimeError, match="rows is on cpu"):
        op(z, rows.cpu(), aw, None, None, 1)
    with pytest.raises(RuntimeError, match="alpha_bias was given for a layer without bias"):
        op(z, rows, aw, aw, None, 1)
    with pytest.raises(RuntimeError, match="bias must have the activation dtype"):
        op(z, rows, aw, None, torch.randn(4, device="cuda").half(), 1)
    with pytest.raises(RuntimeError, match="channel_dim must be 1"):
        op(z, rows, aw, None, None, 2)


@cuda
def test_64bit_indexing():
    _cuda_backend_module()
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs about 20 GiB of free GPU memory")
    # 2 x 4 planes of 2^28 + 2^20 elements: more than 2^31 elements in all, so offsets overflow int32.
    b, c, h, w = 2, 4, 2**14, 2**14 + 64
    # Positive values with a different scale per plane: a plane read at the wrong offset changes the sums.
    z = torch.empty(b, c, h, w, device="cuda", dtype=torch.bfloat16).uniform_(0, 1)
    z.mul_(torch.arange(1, b * c + 1, device="cuda", dtype=torch.bfloat16).view(b, c, 1, 1))
    rows = torch.tensor([2, 0], device="cuda")
    aw, ab = torch.randn(3, c, device="cuda"), torch.randn(3, c, device="cuda")
    bias = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.wfnet.cuda_gate_epilogue(z, rows, aw, ab, bias, 1)
    gate = torch.sigmoid(aw)[rows].view(b, c, 1, 1)
    gbias = (torch.sigmoid(ab)[rows] * bias.float()).view(b, c, 1, 1)
    tail = slice(h - 3, h)  # the last rows of every plane sit beyond 2^31 for the second sample
    torch.testing.assert_close(out[:, :, tail].float(), (gate * z[:, :, tail].float() + gbias).to(torch.bfloat16)
                               .float(), rtol=1e-2, atol=1e-2)
    del out
    _, gaw, gab, _ = torch.ops.wfnet.cuda_gate_backward(z, z, rows, aw, ab, bias, 1, False, True, True, False, False)
    sum_zz = torch.stack([(z[n].float() ** 2).sum(dim=(1, 2)) for n in range(b)])
    sum_z = torch.stack([z[n].float().sum(dim=(1, 2)) for n in range(b)])
    s_w, s_b = torch.sigmoid(aw), torch.sigmoid(ab)
    ref_aw = torch.zeros_like(aw).index_add_(0, rows, sum_zz) * s_w * (1 - s_w)
    ref_ab = torch.zeros_like(ab).index_add_(0, rows, sum_z * bias.float()) * s_b * (1 - s_b)
    torch.testing.assert_close(gaw, ref_aw, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(gab, ref_ab, rtol=1e-3, atol=1e-2)
