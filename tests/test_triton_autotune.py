"""wf_kernels/autotune.py: which GEMM configs survive pruning (shared memory; the register limits measured by
bench/aot_verify.py, re-checked for sm_90 / sm_80 by tests/test_aot_compile.py) and the elementwise kernels' tiles."""
import pytest
import torch

pytest.importorskip("wf_kernels.ops")


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
    assert tiles(nchw) == [(64, 64, 32, 4), (32, 64, 32, 4), (64, 32, 16, 4)]
    nhwc = at.prune_configs(at._HOPPER, bf16, INPUT_PRECISION="ieee", C_INNER=True)
    assert tiles(nhwc) == [(128, 128, 64, 8), (128, 64, 64, 4), (64, 64, 64, 4), (64, 64, 32, 4), (32, 64, 32, 4),
                           (64, 32, 16, 4)]
    for odd in ({"K": 37, "N": 64}, {"C_in": 3, "C_out": 64}, {"K": 64, "N": 50}):  # unaligned operands
        kept = at.prune_configs(at._HOPPER, dict(bf16, **odd), INPUT_PRECISION="ieee", C_INNER=True)
        assert tiles(kept) == [(32, 64, 32, 4), (64, 32, 16, 4)], odd
    assert len(at.prune_configs(at._HOPPER, dict(bf16, K=64, N=1152), INPUT_PRECISION="ieee")) == 11
    misaligned = {"x_ptr": torch.empty(9, dtype=torch.bfloat16)[1:]}  # a view 2 bytes into its storage
    assert tiles(at.prune_configs(at._HOPPER, misaligned)) == [(32, 64, 32, 4), (64, 32, 16, 4)]
    monkeypatch.setattr(at, "CAPABILITY", (8, 0))  # sm_80: channels_last convs at most 64 accumulators
    nhwc = at.prune_configs(at._AMPERE, bf16, INPUT_PRECISION="ieee", C_INNER=True)
    assert nhwc and all(at.accumulators_per_thread(c) <= 64 for c in nhwc)
    assert all(at.accumulators_per_thread(c) <= 128 for c in at._HOPPER + at._AMPERE)
    monkeypatch.setattr(at, "smem_limit", lambda device: 1_000)  # nothing fits: the smallest config, not none
    assert len(at.prune_configs(at._HOPPER, fp32)) == 1
    assert at.m_bucket(160 * 65) == at.m_bucket(250 * 65) == 16384 and at.m_bucket(1) == 64


def test_full_precision_fp32_nchw_convs_keep_at_most_16_accumulators(monkeypatch):
    """The FMA dot of full-precision fp32 with the NCHW scalar gather: 64x64x16 with a folded GELU spilled at 255
    registers on sm_80 (Triton 3.6), aligned or not; 16 accumulators per thread did not."""
    from wf_kernels import autotune as at

    fp32 = {"x_ptr": torch.empty(1, dtype=torch.float32)}
    for cap, configs in (((9, 0), at._HOPPER), ((8, 0), at._AMPERE)):
        monkeypatch.setattr(at, "CAPABILITY", cap)
        for extra in ({}, {"C_in": 3, "C_out": 64}):
            kept = at.prune_configs(configs, dict(fp32, **extra), INPUT_PRECISION="ieee", C_INNER=False)
            assert kept and all(at.accumulators_per_thread(c) <= 16 for c in kept), (cap, extra)
        tf32 = at.prune_configs(configs, fp32, INPUT_PRECISION="tf32", C_INNER=False)
        assert any(at.accumulators_per_thread(c) == 32 for c in tf32)  # the limit is full precision's only


def test_elementwise_tiles():
    """The gate pass's tile (~4K elements, the contiguous dim long) and the backward's smaller one (1K, at most 64
    channels: ptxas -O3 spilled the larger ones' live values to reach its occupancy target, bench/results/aot_*)."""
    from wf_kernels import autotune as at

    assert at.elementwise_tiles(1152, 197, channels_contiguous=True, total=4096) == (128, 32)
    assert at.elementwise_tiles(64, 196, channels_contiguous=False, total=4096) == (16, 256)
    assert at.elementwise_tiles(1152, 197, channels_contiguous=True, total=1024, max_c=64) == (64, 16)
    assert at.elementwise_tiles(3, 1, channels_contiguous=False, total=1024) == (4, 2)  # at least 2 x 2
