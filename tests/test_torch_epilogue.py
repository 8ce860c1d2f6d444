"""The torch backend's epilogue (``wfnet.backends.torch_ref.gate_epilogue``): ``act(z * gate + gated_bias)``, blocked
along the batch, in place without a graph, with a hand-written backward.

Checked against autograd of the plain formula: outputs AND the gradients of z, the gates and the gated bias, for
every foldable activation, fp64 / fp32 / bf16, NCHW / channels_last / linear shapes, each combination of inputs that
need gradients, a bias shared by the batch, one block and many (the block size shrunk so that small shapes split), an
empty batch; gradcheck in fp64 across blocks.
"""
import pytest
import torch

from wfnet.backends import torch_ref
from wfnet.fold import ACT_NAMES, activate

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2}
# (z shape, gate shape, channels_last)
SHAPES = [((3, 5, 4, 6), (3, 5, 1, 1), False), ((3, 5, 4, 6), (3, 5, 1, 1), True), ((2, 7, 5), (2, 1, 5), False),
          ((4, 6), (4, 6), False), ((1, 3, 1, 1), (1, 3, 1, 1), False), ((5, 2, 3, 3), (5, 2, 1, 1), True)]
NEEDS = [(True, True, True), (False, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    if request.param == "many blocks":
        monkeypatch.setattr(torch_ref, "_block_elements", lambda: 4)  # every shape above: one block per row
    return request.param


def _inputs(shape, gshape, cl, dtype, gen, bias_shape=None):
    z = torch.randn(shape, generator=gen).mul_(3).to(dtype)
    if cl:
        z = z.contiguous(memory_format=torch.channels_last)
    g = torch.rand(gshape, generator=gen)
    b = torch.randn(bias_shape or gshape, generator=gen)
    return z, g, b


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_autograd_of_the_formula(act, dtype, blocks):
    gen = torch.Generator().manual_seed(0)
    for shape, gshape, cl in SHAPES:
        for bias_shape in (None, (1,) + gshape[1:]):  # per-sample gated bias, one bias for the whole batch
            z0, g0, b0 = _inputs(shape, gshape, cl, dtype, gen, bias_shape)
            go = torch.randn(shape, generator=gen).to(dtype)
            for need in NEEDS:
                leaves = [t.clone().requires_grad_(n) for t, n in zip((z0, g0, b0), need)]
                ref_leaves = [t.clone().requires_grad_(n) for t, n in zip((z0, g0, b0), need)]
                z, g, b = leaves
                out = torch_ref.gate_epilogue(z * 1 if need[0] else z.clone(), g, b, act)  # z: a fresh tensor
                zr, gr, br = ref_leaves
                ref = activate(zr * gr.to(dtype) + br.to(dtype), act, in_place=False)
                assert out.dtype == ref.dtype and out.shape == ref.shape
                assert _rel(out, ref) <= TOL[dtype], (shape, cl, need)
                wanted = [t for t in leaves if t.requires_grad]
                grads = torch.autograd.grad(out, wanted, go)
                grads_ref = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], go)
                for a, r in zip(grads, grads_ref):
                    assert a.dtype == r.dtype and a.shape == r.shape
                    assert _rel(a, r) <= TOL[dtype], (shape, cl, need, bias_shape)


@pytest.mark.parametrize("act", ACT_NAMES)
def test_without_a_graph_it_writes_into_z(act, blocks):
    gen = torch.Generator().manual_seed(1)
    for shape, gshape, cl in SHAPES:
        z, g, b = _inputs(shape, gshape, cl, torch.float32, gen)
        ref = activate(z * g + b, act, in_place=False)
        fresh = z.clone(memory_format=torch.preserve_format)
        with torch.no_grad():
            out = torch_ref.gate_epilogue(fresh, g, b, act)
        assert _rel(out, ref) <= TOL[torch.float32]
        if act != "gelu":  # gelu has no in-place form
            assert out.data_ptr() == fresh.data_ptr()
        # with gradients enabled but nothing requiring them, also in place
        fresh = z.clone(memory_format=torch.preserve_format)
        out = torch_ref.gate_epilogue(fresh, g, None, act)
        assert _rel(out, activate(z * g, act, in_place=False)) <= TOL[torch.float32]


@pytest.mark.parametrize("act", ["none", "relu", "silu", "hardswish"])
def test_gradcheck_across_blocks(act, monkeypatch):
    monkeypatch.setattr(torch_ref, "_block_elements", lambda: 8)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.rand(5, 3, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    assert len(torch_ref._blocks(z)) > 1
    assert torch.autograd.gradcheck(lambda z, g, b: torch_ref.gate_epilogue(z * 1, g, b, act), (z, g, b))


def test_blocks_cover_the_batch_once():
    for n, per_row in ((0, 10), (1, 10 ** 7), (128, 65536), (7, 3)):
        z = torch.empty(n, per_row)
        got = torch_ref._blocks(z)
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        if n > 1 and n * per_row > 4 * torch_ref._block_elements():
            assert len(got) > 1 and all(j - i >= 1 for i, j in got)


def test_empty_batch():
    z = torch.randn(0, 3, 4, 4, requires_grad=True)
    g = torch.rand(0, 3, 1, 1, requires_grad=True)
    out = torch_ref.gate_epilogue(z * 1, g, None, "relu")
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and z.grad.shape == z.shape and g.grad.shape == g.shape


def test_unknown_activation_is_refused():
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="unknown activation"):
        torch_ref.gate_epilogue(z * 1, torch.rand(2, 3), None, "tanh")


def test_double_backward_is_refused_loudly():
    """The backward is written with out= ops: differentiating it again raises instead of returning wrong values."""
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.rand(2, 3, 1, 1, requires_grad=True)
    out = torch_ref.gate_epilogue(z * 1, g, None, "relu")
    (gz,) = torch.autograd.grad(out, z, torch.randn(out.shape, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gz.sum().backward()


def test_one_block_off_the_cpu(monkeypatch):
    """Blocks are a CPU cache / page-fault measure; on another device each would cost a kernel launch per op."""
    monkeypatch.setattr(torch_ref, "_block_elements", lambda: 64)
    assert torch_ref._blocks(torch.empty(16, 4, 4, 4, device="meta")) == [(0, 16)]
    assert len(torch_ref._blocks(torch.empty(16, 4, 4, 4))) == 16
