"""The wf_kernels custom ops under torch.library.opcheck, and torch.compile(fullgraph=True) of a wrapped model.

opcheck verifies the schema, the fake (meta) kernels against the real ones (shapes, strides, dtypes), the autograd
registration and AOT dispatch. The compiled model runs the filtered layers on the "triton" backend on CPU (kernels
under the interpreter) with no graph break, and must match the eager torch backend in outputs and gate gradients.
"""
import pytest
import torch
import torch.nn as nn

import wfnet

pytest.importorskip("wf_kernels.ops")
import wf_kernels.ops  # noqa: E402,F401  (registers torch.ops.wf_kernels.*)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.wf_kernels
# inductor on GPU; on CPU aot_eager (same dynamo capture + AOT autograd trace of the fake kernels, no C++ codegen:
# inductor took ~50 s here on 2 shared cores)
COMPILE_BACKEND = "inductor" if DEV == "cuda" else "aot_eager"


def _sample_gates(b, c, bias=True):
    """Per-sample gates g [B, C] and gated bias gb [B, C] (fp32), as wf_kernels.gates.sample_gates makes them."""
    g = torch.rand(b, c, device=DEV, requires_grad=True)
    gb = torch.randn(b, c, device=DEV, requires_grad=True) if bias else None
    return g, gb


@pytest.mark.parametrize("path", ["gemm", "epilogue"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear(path, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, device=DEV, requires_grad=True)
    w = torch.randn(20, 12, device=DEV)
    g, gb = _sample_gates(3, 20, bias)
    for save_z in (True, False):
        torch.library.opcheck(OPS.linear_fwd.default, (x, w, g, gb, path, save_z, "ieee"))


@pytest.mark.parametrize("path", ["implicit_gemm", "epilogue"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_conv2d(path, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, device=DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(5, 3, 3, 3, device=DEV)
    g, gb = _sample_gates(2, 5)
    torch.library.opcheck(OPS.conv2d_fwd.default, (x, w, g, gb, [2, 1], [1, 1], [1, 1], 1, path, True, "ieee"))


def test_opcheck_gate_bwd():
    torch.manual_seed(0)
    go = torch.randn(2, 5, 4, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 5, 4, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    g = torch.rand(2, 5, device=DEV)
    torch.library.opcheck(OPS.gate_bwd.default, (go, z, g, 1, True, True, True))


def test_opcheck_gate_rows():
    from wf_kernels.gates import segments

    torch.manual_seed(0)
    alpha = torch.randn(6, 9, device=DEV, requires_grad=True)
    rows = torch.tensor([5, 0, 5, 2], device=DEV)
    perm, starts = segments(rows, 6)
    torch.library.opcheck(OPS.gate_rows.default, (alpha, rows, perm, starts))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_compile_fullgraph_wrapped_model_matches_eager():
    torch.manual_seed(0)
    wf = wfnet.wrap(_Net().to(DEV), num_classes=4)
    for p in wf.filter_parameters():
        p.data.normal_(0, 2)
    x = torch.randn(3, 3, 8, 8, device=DEV)
    rows = torch.tensor([1, 3, 1], device=DEV)

    def loss_fn(m):
        out = m(x, forget=rows)
        return out, out.square().sum()

    with wfnet.use_backend("torch"):
        ref_out, ref_loss = loss_fn(wf)
        ref_loss.backward()
    ref_grads = [p.grad.clone() for p in wf.filter_parameters()]
    wf.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(wf, fullgraph=True, backend=COMPILE_BACKEND)  # fullgraph: a graph break raises
    with wfnet.use_backend("triton"):
        out, loss = loss_fn(compiled)
        loss.backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for g, r in zip([p.grad for p in wf.filter_parameters()], ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
