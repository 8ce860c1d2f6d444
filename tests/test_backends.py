"""Backend selection: set_backend / use_backend / WFNET_BACKEND, "auto" on CPU, unknown names, and the
BackendUnavailableError an explicit backend raises (with every reason) when it cannot run an input.

Fake backends are registered by monkeypatching the registry's caches, so these tests do not depend on Triton or the
CUDA extension being importable here.
"""
import threading

import pytest
import torch

import wfnet
from wfnet import backends, ops
from wfnet.backends import torch_ref

TORCH = torch_ref.BACKEND  # the real math, held before any test swaps the registry entry


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv("WFNET_BACKEND", raising=False)
    wfnet.set_backend(None)
    # private copies of the caches, so fake registrations never leak into other tests
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    monkeypatch.setattr(backends, "_import_errors", dict(backends._import_errors))
    yield
    wfnet.set_backend(None)


class Recorder:
    """A working backend that records which op it ran (delegates the math to the torch backend)."""

    def __init__(self, name, reasons=()):
        self.name = name
        self.reasons = list(reasons)
        self.calls = []

    def unsupported(self, op, **args):
        return list(self.reasons)

    def conv2d(self, **args):
        self.calls.append("conv2d")
        return TORCH.conv2d(**args)

    def linear(self, **args):
        self.calls.append("linear")
        return TORCH.linear(**args)


def _spy(monkeypatch, name):
    """Replace the registered backend ``name`` by a recorder (keeping its results)."""
    rec = Recorder(name)
    monkeypatch.setitem(backends._loaded, name, rec)
    return rec


def _conv_call(backend=None):
    x = torch.randn(2, 3, 6, 6)
    return ops.wf_conv2d(x, torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(5, 4), torch.randn(5, 4),
                         torch.tensor([1, 4]), padding=1, backend=backend)


def _linear_call(backend=None):
    return ops.wf_linear(torch.randn(2, 3, 5), torch.randn(4, 5), None, torch.randn(5, 4), None, 3,
                         backend=backend)


def test_default_is_auto_and_auto_picks_torch_on_cpu(monkeypatch):
    assert wfnet.get_backend() == "auto"
    rec = _spy(monkeypatch, "torch")
    _conv_call()
    _linear_call(backend="auto")
    assert rec.calls == ["conv2d", "linear"]
    args = dict(x=torch.zeros(1, 3, 4, 4))
    assert backends.resolve_backend("conv2d", "auto", args) is rec


def test_available_backends_reports_the_cpu_ones():
    avail = wfnet.available_backends()
    assert set(avail) == {"naive", "torch", "triton", "cuda"}
    assert avail["torch"] is None and avail["naive"] is None


def test_set_backend(monkeypatch):
    rec = _spy(monkeypatch, "naive")
    wfnet.set_backend("naive")
    assert wfnet.get_backend() == "naive"
    _conv_call()
    assert rec.calls == ["conv2d"]
    wfnet.set_backend(None)
    assert wfnet.get_backend() == "auto"
    _conv_call()
    assert rec.calls == ["conv2d"]


def test_use_backend_nests_restores_and_is_per_thread(monkeypatch):
    naive = _spy(monkeypatch, "naive")
    wfnet.set_backend("torch")
    seen_in_thread = []
    with wfnet.use_backend("naive"):
        assert wfnet.get_backend() == "naive"
        with wfnet.use_backend("torch"):
            assert wfnet.get_backend() == "torch"
        _linear_call()
        t = threading.Thread(target=lambda: seen_in_thread.append(wfnet.get_backend()))
        t.start()
        t.join()
    assert seen_in_thread == ["torch"]  # another thread sees the process default, not this thread's override
    assert wfnet.get_backend() == "torch"
    assert naive.calls == ["linear"]
    with pytest.raises(KeyError):
        with wfnet.use_backend("naive"):
            raise KeyError("boom")
    assert wfnet.get_backend() == "torch"


def test_env_var(monkeypatch):
    rec = _spy(monkeypatch, "naive")
    monkeypatch.setenv("WFNET_BACKEND", "naive")
    assert wfnet.get_backend() == "naive"
    _linear_call()
    assert rec.calls == ["linear"]
    wfnet.set_backend("torch")  # an explicit default wins over the environment
    assert wfnet.get_backend() == "torch"
    wfnet.set_backend(None)
    monkeypatch.setenv("WFNET_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        wfnet.get_backend()


def test_unknown_backend_name():
    for call in (lambda: wfnet.set_backend("fast"), lambda: _conv_call(backend="fast"),
                 lambda: _linear_call(backend="fast")):
        with pytest.raises(ValueError, match=r"unknown backend 'fast'.*torch"):
            call()
    with pytest.raises(ValueError, match="unknown backend"):
        with wfnet.use_backend("fast"):
            pass
    assert wfnet.get_backend() == "auto"


def test_explicit_backend_that_cannot_run_lists_every_reason(monkeypatch):
    fake = Recorder("triton", reasons=["needs a CUDA tensor", "groups > 1 not supported"])
    monkeypatch.setitem(backends._loaded, "triton", fake)
    with pytest.raises(wfnet.BackendUnavailableError) as err:
        _conv_call(backend="triton")
    msg = str(err.value)
    assert "'triton'" in msg and "needs a CUDA tensor" in msg and "groups > 1 not supported" in msg
    assert fake.calls == []
    with wfnet.use_backend("triton"), pytest.raises(wfnet.BackendUnavailableError, match="needs a CUDA tensor"):
        _linear_call()


def test_explicit_backend_that_fails_to_import(monkeypatch):
    monkeypatch.setitem(backends._BACKEND_MODULES, "cuda", "wfnet._no_such_extension_module")
    backends._loaded.pop("cuda", None)
    backends._import_errors.pop("cuda", None)
    with pytest.raises(wfnet.BackendUnavailableError, match=r"'cuda' failed to import.*No module named"):
        _conv_call(backend="cuda")
    assert wfnet.available_backends()["cuda"].startswith("backend 'cuda' failed to import")


def test_auto_skips_backends_with_reasons_and_lists_all_when_none_fits(monkeypatch):
    bad = Recorder("triton", reasons=["shape too small"])
    good = _spy(monkeypatch, "torch")
    monkeypatch.setitem(backends._loaded, "triton", bad)
    monkeypatch.setattr(backends, "auto_choice", lambda device: (("triton", "torch"), "test order"))
    _conv_call()
    assert bad.calls == [] and good.calls == ["conv2d"]
    good.reasons = ["disabled for this test"]
    with pytest.raises(wfnet.BackendUnavailableError) as err:
        _conv_call()
    assert "triton: shape too small" in str(err.value) and "torch: disabled for this test" in str(err.value)


def test_naive_is_never_picked_automatically():
    ok = {"verified": True}
    everything = {"GPU": {name: ok for name in ("naive", "torch", "triton", "cuda")}}
    assert "naive" not in backends.auto_choice("cpu")[0]
    assert "naive" not in backends.cuda_auto_order("GPU", everything)[0]


# ------------------------------------------------------------------------------- "auto" and the verification record
def test_auto_on_cuda_takes_only_verified_fused_backends():
    from wfnet.backends import cuda_auto_order

    name = "NVIDIA H100 80GB HBM3"
    order, reason = cuda_auto_order(name, {})
    assert order == ("torch",) and "no GPU check recorded" in reason
    ok = {"verified": True, "date": "2026-11-25", "torch": "2.11.0"}
    bad = {"verified": False, "date": "2026-11-25", "reasons": ["3 tests failed"]}
    order, reason = cuda_auto_order(name, {name: {"triton": bad, "cuda": ok}})
    assert order == ("cuda", "torch") and "3 tests failed" in reason and "cuda first" in reason
    order, _ = cuda_auto_order(name, {name: {"triton": ok, "cuda": ok}})
    assert order == ("triton", "cuda", "torch")
    order, reason = cuda_auto_order("NVIDIA A100-SXM4-80GB", {name: {"triton": ok}})  # verified elsewhere only
    assert order == ("torch",) and name in reason


def test_auto_choice_on_cpu_is_torch_and_explained():
    from wfnet.backends import auto_choice

    order, reason = auto_choice("cpu")
    assert order == ("torch",) and "cpu" in reason


def test_explicit_fused_backend_is_honoured_even_where_auto_would_not_pick_it():
    """auto on CPU never takes triton; an explicit request does (here under the Triton interpreter)."""
    pytest.importorskip("wf_kernels.ops")
    from wfnet.backends import resolve_backend
    from wfnet.rows import Rows

    x = torch.randn(2, 3, 4)
    args = dict(x=x, weight=torch.randn(5, 4), bias=None, alpha_weight=torch.zeros(3, 5), alpha_bias=None,
                rows=Rows.prepare([0, 2], 3, 2).bind(x))
    assert resolve_backend("linear", "auto", args).name == "torch"
    if not torch.cuda.is_available():
        assert resolve_backend("linear", "triton", args).name == "triton"


def test_backend_status_says_what_imports_what_runs_here_and_what_auto_picks(monkeypatch):
    from wfnet.backends import backend_status

    st = backend_status("cpu")
    assert set(st) == {"naive", "torch", "triton", "cuda"}
    assert st["torch"] == {"imports": True, "runs_here": True, "why_not": None, "auto_picks": True,
                           "auto": "tried 1 of 1"}
    assert st["naive"]["runs_here"] and not st["naive"]["auto_picks"] and st["naive"]["auto"] == "never (reference)"
    for name in ("triton", "cuda"):  # a reason exactly when it cannot run here
        assert st[name]["runs_here"] == (st[name]["why_not"] is None)
