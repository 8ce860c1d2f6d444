"""The row type (wfnet.rows): validated once per model forward, bound once per device, shared by every layer;
folded batches only where declared; per-batch class segments; the range check under torch.compile; and the fp32
precision / tolerance selection the GPU tests rely on."""
import pytest
import torch
import torch.nn as nn

import wfnet
from wfnet.profiling import count_host_syncs
import wfnet.rows as R
from wfnet.rows import Rows


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(5, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


@pytest.mark.parametrize("rows", [torch.tensor([3, 0, 1]), 2, [1, 1, 0], torch.tensor(3)],
                         ids=["tensor", "int", "list", "0-d"])
def test_rows_are_validated_once_per_forward_and_shared_by_every_layer(monkeypatch, rows):
    wf = wfnet.wrap(_net(), num_classes=4)
    seen = []
    real = wfnet.ops.conv2d_prepared
    monkeypatch.setattr(wfnet.ops, "conv2d_prepared", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    x = torch.randn(3, 3, 6, 6)
    before = R.VALIDATIONS[0]
    wf(x, forget=rows)
    assert R.VALIDATIONS[0] - before == 1  # once for the whole forward, not once per layer (3 layers)
    assert len(seen) == 3 and len({id(r.index) for r in seen}) == 1  # one device copy, reused
    assert all(r.index.dtype == torch.long and r.index.shape == (3,) for r in seen)


def test_forgetting_context_validates_once_for_many_forwards():
    wf = wfnet.wrap(_net(), num_classes=4)
    x = torch.randn(2, 3, 6, 6)
    before = R.VALIDATIONS[0]
    with wfnet.forgetting(wf, torch.tensor([1, 3])):
        wf.model(x)
        wf.model(x)
    assert R.VALIDATIONS[0] - before == 1


def test_prepared_rows_are_not_rechecked_and_bad_rows_never_reach_a_backend(monkeypatch):
    rows = Rows.prepare(torch.tensor([0, 2]), 3, 2)
    before = R.VALIDATIONS[0]
    assert Rows.prepare(rows, 3, 2) is rows and R.VALIDATIONS[0] == before
    with pytest.raises(ValueError, match="prepared for num_classes=3, this model has 4"):
        Rows.prepare(rows, 4, 2)
    called = []
    monkeypatch.setattr(wfnet.ops, "resolve_backend", lambda *a: called.append(a))
    x, w = torch.randn(2, 5), torch.randn(6, 5)
    for bad, exc in ((torch.tensor([0, 3]), ValueError), (torch.tensor([-1, 0]), ValueError),
                     (torch.tensor([0.0, 1.0]), TypeError), (True, TypeError), (torch.tensor([0, 1, 2]), ValueError)):
        with pytest.raises(exc):
            wfnet.ops.wf_linear(x, w, None, torch.zeros(3, 6), None, bad)
    assert called == []


def test_folded_rows_repeat_each_sample_only_when_declared():
    rows = Rows.prepare(torch.tensor([2, 0]), 3, 2)
    assert rows.on("cpu", 6, folded=True).tolist() == [2, 2, 2, 0, 0, 0]  # each sample's windows consecutive
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        rows.on("cpu", 6)  # a leading size that is not the batch, undeclared: never guessed
    with pytest.raises(ValueError, match="not a multiple"):
        rows.on("cpu", 5, folded=True)
    assert Rows.prepare(1, 3).on("cpu", 4).tolist() == [1, 1, 1, 1]


def test_segments_cover_every_class_in_stable_order_and_are_cached():
    rows = Rows.prepare(torch.tensor([3, 1, 3, 0, 1, 3]), 5, 6)
    perm, starts = rows.segments("cpu")
    assert starts.tolist() == [0, 1, 3, 3, 6, 6]  # class 2 and 4 have empty segments
    assert perm.tolist() == [3, 1, 4, 0, 2, 5]
    assert rows.segments("cpu")[0] is perm


def test_compiled_model_still_rejects_out_of_range_rows():
    wf = wfnet.wrap(_net(), num_classes=4)
    compiled = torch.compile(wf, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(compiled(x, forget=torch.tensor([0, 3])), wf(x, forget=torch.tensor([0, 3])))
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(x, forget=torch.tensor([0, 4]))


def test_dot_precision_and_test_tolerances_follow_torch_tf32_flags():
    pytest.importorskip("wf_kernels.launch")
    from tolerances import EXACT_FP32, TF32, tf32, tolerance
    from wf_kernels.launch import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        assert dot_precision("linear", torch.float32) == "ieee" and dot_precision("conv2d", torch.float32) == "tf32"
        assert tolerance(torch.float32, "linear", "cuda") == EXACT_FP32
        assert tolerance(torch.float32, "conv2d", "cuda") == TF32
        assert tolerance(torch.float32, "conv2d", "cpu") == EXACT_FP32  # the interpreter computes exact fp32
        torch.set_float32_matmul_precision("high")
        assert dot_precision("linear", torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        with tf32(False):
            assert dot_precision("conv2d", torch.float32) == "ieee"
            assert tolerance(torch.float32, "conv2d", "cuda") == EXACT_FP32
        assert dot_precision("linear", torch.bfloat16) == "ieee"  # 16-bit operands: not a TF32 question
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------ GPU: host syncs
def _count_syncs(fn) -> int:
    """Device-to-host syncs that torch reports while ``fn`` runs (wfnet.profiling, as the benchmarks count them)."""
    return count_host_syncs(fn).count


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_syncs_at_most_once_per_model_forward(backend):
    """CPU rows and int rows: no sync at all; CUDA rows: one (their range check), never one per layer."""
    wf = wfnet.wrap(_net(), num_classes=4).cuda()
    x = torch.randn(8, 3, 6, 6, device="cuda")
    cpu_rows = torch.randint(0, 4, (8,))
    cuda_rows = cpu_rows.cuda()
    with wfnet.use_backend(backend), torch.no_grad():
        wf(x, forget=cpu_rows)  # warm-up: Triton compiles / autotunes on the first call
        assert _count_syncs(lambda: wf(x, forget=cpu_rows)) == 0
        assert _count_syncs(lambda: wf(x, forget=2)) == 0
        assert _count_syncs(lambda: wf(x, forget=cuda_rows)) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_untraining_step_syncs_only_for_the_progress_bar(backend):
    from wfnet import untrain as U

    wf = wfnet.wrap(_net(), num_classes=4).cuda().eval()
    params = list(wf.filter_parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    cfg = U.recipe("tuned", "cnn")
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))

    def step():
        U.untrain_step(wf, params, opt, x, y, 4, cfg, torch.Generator().manual_seed(0), "cuda")

    with wfnet.use_backend(backend):
        step()  # warm-up
        assert _count_syncs(step) == 1  # the loss parts for the progress bar, fetched in one copy


def test_compiled_model_does_not_recompile_for_new_rows():
    """Row validation under torch.compile leaves no Python state that dynamo would guard on (a counter, a lazily
    created per-thread stack): one frame for any number of calls with different rows."""
    import torch._dynamo.testing

    wf = wfnet.wrap(_net(), num_classes=4)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(wf, backend=counter)
    x = torch.randn(2, 3, 6, 6)
    for i in range(4):
        compiled(x, forget=torch.tensor([i % 4, 3 - i % 4]))
    assert counter.frame_count == 1


def test_compiled_model_takes_a_0d_tensor_row_for_the_whole_batch():
    wf = wfnet.wrap(_net(), num_classes=4)
    compiled = torch.compile(wf, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(compiled(x, forget=torch.tensor(2)), wf(x, forget=2))
