"""wf_kernels/backward.py: the fused gate backward ``gate_backward`` (grad_z, and the per-sample sums behind the gate
gradients) against its reference (autograd through the activation in fp32 torch) over random shapes (NCHW,
channels_last, tokens; odd sizes, batch 1, one channel), every folded activation, with and without the gated bias
of a folded BatchNorm, each subset of the outputs; and its custom op's fake kernel. Kernels under TRITON_INTERPRET=1
on CPU (conftest.py)."""
import pytest
import torch

pytest.importorskip("wf_kernels.ops")
from wf_kernels import backward  # noqa: E402
from wf_kernels.activation import ACTIVATIONS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [((2, 5, 7, 3), torch.contiguous_format, 1), ((3, 9, 4, 5), torch.channels_last, 1),
          ((1, 1, 2, 2), torch.contiguous_format, 1), ((2, 7, 130), None, -1), ((1, 70, 3), None, -1)]


def _tensors(shape, fmt, cdim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g).to(DEV, dtype)
    go = torch.randn(shape, generator=g).to(DEV, dtype)
    if fmt is not None:
        z, go = z.contiguous(memory_format=fmt), go.contiguous(memory_format=fmt)
    b, c = shape[0], shape[cdim]
    return go, z, torch.rand(b, c, generator=g).to(DEV) * 2, torch.randn(b, c, generator=g).to(DEV)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_backward_matches_the_reference(act, dtype):
    tol = {torch.float32: 1e-4, torch.float16: 3e-3}[dtype]
    for i, (shape, fmt, cdim) in enumerate(SHAPES):
        go, z, gates, gb = _tensors(shape, fmt, cdim, dtype, i)
        for with_gb in (False, True):
            ref_gz, ref_g, ref_gb = backward.reference(go, z, gates, cdim, gb if with_gb else None, act)
            for need in ((True, True, True), (False, True, True), (True, False, False)):
                gz, grad_g, grad_gb = backward.gate_backward(go, z, gates, cdim, *need, gb=gb if with_gb else None,
                                                             act=act)
                what = f"{shape} {act} {dtype} gb={with_gb} need={need}"
                if need[0]:
                    assert gz.shape == z.shape and gz.stride() == z.stride() and gz.dtype == dtype, what
                    torch.testing.assert_close(gz.float(), ref_gz.float(), rtol=tol, atol=tol, msg=what)
                else:
                    assert gz.numel() == 0, what
                if need[1]:
                    torch.testing.assert_close(grad_g, ref_g, rtol=tol, atol=tol * shape[-1], msg=what)
                    torch.testing.assert_close(grad_gb, ref_gb, rtol=tol, atol=tol * shape[-1], msg=what)


def test_gate_backward_without_z_refuses_what_needs_it():
    go, z, gates, gb = _tensors((2, 3, 4, 4), None, 1, torch.float32, 0)
    gz, _, _ = backward.gate_backward(go, z.new_empty(0), gates, 1, True, False, False)
    torch.testing.assert_close(gz, go * gates[:, :, None, None])
    with pytest.raises(RuntimeError, match="z was not saved"):
        backward.gate_backward(go, z.new_empty(0), gates, 1, False, True, False)
    with pytest.raises(RuntimeError, match="needs z"):
        backward.gate_backward(go, z.new_empty(0), gates, 1, True, False, False, act="gelu")


def test_the_fake_kernel_gives_the_op_outputs_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        go = torch.empty(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
        gz, grad_g, grad_gb = torch.ops.wf_kernels.gate_bwd(go, go, torch.empty(2, 6), 1, True, True, False)
        assert gz.shape == go.shape and gz.is_contiguous(memory_format=torch.channels_last)
        assert grad_g.shape == (2, 6) and grad_g.dtype == torch.float32 and grad_gb.numel() == 0
