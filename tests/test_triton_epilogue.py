"""wf_kernels/epilogue.py: the separate gate pass ``gate_forward`` against its reference over random shapes (NCHW,
channels_last, tokens; odd sizes, batch 1, a 1-channel output), every folded activation, with and without a gated
bias, in place and not. Kernels under TRITON_INTERPRET=1 on CPU (conftest.py)."""
import pytest
import torch

pytest.importorskip("wf_kernels.ops")
from wf_kernels import epilogue  # noqa: E402
from wf_kernels.activation import ACTIVATIONS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [((2, 5, 7, 3), torch.contiguous_format, 1), ((3, 9, 4, 5), torch.channels_last, 1),
          ((1, 1, 2, 2), torch.contiguous_format, 1), ((2, 7, 130), None, -1), ((1, 3, 1), None, -1)]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gate_forward_matches_the_reference(act, dtype):
    g = torch.Generator().manual_seed(len(act))
    for i, (shape, fmt, cdim) in enumerate(SHAPES):
        z = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
        if fmt is not None:
            z = z.contiguous(memory_format=fmt)
        b, c = shape[0], shape[cdim]
        gates = torch.rand(b, c, generator=g).to(DEV)
        gb = torch.randn(b, c, generator=g).to(DEV) if i % 2 == 0 else None
        ref = epilogue.reference(z, gates, gb, cdim, act)
        out = epilogue.gate_forward(z, gates, gb, cdim, act=act)
        assert out.stride() == z.stride() and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
        inplace = z.clone()
        assert epilogue.gate_forward(inplace, gates, gb, cdim, in_place=True, act=act) is inplace
        assert torch.equal(inplace, out)


def test_an_ungated_bias_with_sample_stride_0():
    """gb may be a bias expanded over the samples (stride 0): the layers without bias gates pass it so."""
    z = torch.randn(4, 6, 3, 3, device=DEV)
    gates = torch.rand(4, 6, device=DEV)
    bias = torch.randn(6, device=DEV).unsqueeze(0).expand(4, -1)
    torch.testing.assert_close(epilogue.gate_forward(z, gates, bias, 1), epilogue.reference(z, gates, bias, 1))
