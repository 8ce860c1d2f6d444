"""wf_kernels/gates.py: the class segments of a batch, the deterministic class reduction (``class_grad``) against its
reference, and the segments shared by every layer of a forward (built once). Kernels under TRITON_INTERPRET=1 on
CPU (conftest.py)."""
import pytest
import torch

import wfnet

pytest.importorskip("wf_kernels.ops")
from wf_kernels import gates  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("nc,rows", [(5, [4, 0, 4, 4, 2, 0]), (1000, [999, 3, 3]), (4, [1]), (3, [])])
def test_class_segments_and_class_grad_match_index_add(nc, rows):
    """The fixed grid over all classes (empty classes exit at once) equals index_add of the per-sample grads."""
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


@pytest.mark.parametrize("nc,b,c", [(1, 1, 1), (7, 13, 300), (1000, 5, 33)])
def test_gate_rows_and_its_gradient_match_the_reference(nc, b, c):
    """sigmoid(A)[rows] forward, and its autograd (class_grad over the segments) against gates.reference."""
    g = torch.Generator().manual_seed(nc + b)
    alpha = (torch.randn(nc, c, generator=g) * 3).to(DEV).requires_grad_(True)
    rows = torch.randint(0, nc, (b,), generator=g).to(DEV)
    perm, starts = gates.segments(rows, nc)
    out = gates.gate_rows(alpha, rows, perm, starts)
    torch.testing.assert_close(out, torch.sigmoid(alpha.detach())[rows])
    grad = torch.randn(b, c, generator=g).to(DEV)
    out.backward(grad)
    torch.testing.assert_close(alpha.grad, gates.reference(grad, alpha.detach(), rows), rtol=1e-6, atol=1e-6)
