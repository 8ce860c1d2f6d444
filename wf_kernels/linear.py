"""Fused filtered linear (the ViT qkv projection): a tiled Triton GEMM with the per-sample gate as its epilogue.

    out[m, :] = g[m // T] * (x[m, :] @ W^T) + gb[m // T]      (T tokens per sample; g, gb: fp32 [B, N])

x is flattened to [M = B*T, K]; each output tile loads its rows' sample gates (token -> sample) inside the epilogue
(``epilogue.gate_tile``), so the gate costs one [BLOCK_M, BLOCK_N] load of the small per-sample gate matrix and the
output is stored once. Accumulation is fp32; fp32 operands use TF32 only where torch allows it for matmuls
(``launch.dot_precision``), so the result matches cuBLAS under the same flags. Output in the input dtype. When the gate logits need a gradient the bias-free product z is stored as a second output (what
autograd would save; the backward needs sum grad_out * z).

The other path, "epilogue" (cuBLAS matmul, then ``epilogue.gate_forward``), is used where the fused GEMM cannot run
correctly (bf16 under the Triton interpreter, whose tl.dot is wrong for bf16), when forced, or where a measurement or
the roofline prediction for the GPU ranks it faster (see ``dispatch``).

In this file: ``reference`` -> ``_wf_linear_fwd_kernel`` -> ``linear_forward`` (the launcher) -> the custom op
``wf_kernels::linear_fwd`` + fake -> its autograd (the fused gate backward of ``backward.py``, then cuBLAS for
grad_x / grad_W) -> ``wf_linear``, the functional entry the "triton" backend calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import dispatch
from .activation import Activation, check_activation
from .autotune import gemm_configs, grouped_tile, m_bucket, prune_configs
from .backward import fused_gate_grads, save_z_for_backward
from .epilogue import gate_forward, gate_store
from .epilogue import reference as epilogue_reference
from .gates import sample_gates, segments_fn
from .launch import device_guard, dot_precision


def reference(x3: Tensor, weight: Tensor, g: Tensor, gb: Tensor | None, act: Activation = "none") -> Tensor:
    """``act(g * (x @ W^T) + gb)`` per sample in fp32 torch, rounded to x's dtype, for tests (x3 [B, T, K])."""
    return epilogue_reference(x3.float() @ weight.float().t(), g, gb, -1, act).to(x3.dtype)


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _wf_linear_fwd_kernel(
    x_ptr, w_ptr, g_ptr, gb_ptr, out_ptr, z_ptr,
    M, N, K, T, M_BUCKET,  # x: [M, K], W: [N, K], out/z: [M, N]; T tokens per sample; M_BUCKET: autotune key only
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_gbn,
    HAS_GB: tl.constexpr, STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, ACT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        mask_k = kk < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    gate_store(acc, offs_m // T, offs_m * stride_om, pid_n * BLOCK_N, mask_m, g_ptr, gb_ptr, out_ptr, z_ptr, N,
               stride_gbn, stride_on, HAS_GB, STORE_Z, BLOCK_M, BLOCK_N, EPILOGUE_SUBTILES, ACT)


def linear_forward(x3, weight, g, gb, path: str, save_z: bool, precision: str, act: Activation = "none"):
    """x3: [B, T, K] -> (out [B, T, N], z [B, T, N] or an empty tensor). ``g`` / ``gb``: fp32 [B, N] sample gates
    (gb None without bias); ``act``: a folded activation applied to the gated output (wfnet.fold). ``path``: "gemm" or "epilogue"; ``precision``: ``tl.dot``'s fp32 input precision.
    An argument added here that selects a kernel variant must be annotated bool / typing.Literal[...] / an Enum:
    bench/aot_verify.py enumerates such arguments from the annotation and compiles every variant for sm_90 / sm_80."""
    b, t, k = x3.shape
    n = weight.shape[0]
    empty = x3.new_empty(0)
    if path == "epilogue":
        z = F.linear(x3, weight)
        return gate_forward(z, g, gb, channel_dim=-1, in_place=not save_z, act=act), (z if save_z else empty)
    if path != "gemm":
        raise ValueError(f"unknown linear path {path!r}; expected 'gemm' or 'epilogue'")
    out = x3.new_empty(b, t, n)
    z = x3.new_empty(b, t, n) if save_z else empty
    m = b * t
    if m == 0 or n == 0:
        return out, z
    if k == 0:  # empty reduction: z = 0, out = gated bias
        z0 = x3.new_zeros(b, t, n)
        return gate_forward(z0, g, gb, -1, act=act), (z0 if save_z else empty)
    x2 = x3.reshape(m, k)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(x3):
        _wf_linear_fwd_kernel[grid](
            x2, weight, g, gb if gb is not None else g, out, z if save_z else out,
            m, n, k, t, m_bucket(m), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), n, 1,
            gb.stride(0) if gb is not None else 0,
            HAS_GB=gb is not None, STORE_Z=save_z, INPUT_PRECISION=precision, ACT=check_activation(act),
        )
    return out, z


# ------------------------------------------------------------------------------------------ custom op + fake kernel
@torch.library.custom_op("wf_kernels::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, g: Tensor, gb: Optional[Tensor], path: str, save_z: bool,
               precision: str, act: str = "none") -> Tuple[Tensor, Tensor]:
    return linear_forward(x, weight, g, gb, path, save_z, precision, act)


@linear_fwd.register_fake
def _(x, weight, g, gb, path, save_z, precision, act="none"):
    out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
    return out, (torch.empty_like(out) if save_z else x.new_empty(0))


# ------------------------------------------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    x, weight, g, gb, path, save_z, precision, *act = inputs
    ctx.act = act[0] if act else "none"
    ctx.save_for_backward(x, weight, g, gb if ctx.act != "none" else None, output[1])


def _backward(ctx, grad_out, _grad_z_unused):
    x, weight, gz, grad_g, grad_gb = fused_gate_grads(ctx, grad_out, -1, lambda x, w: torch.matmul(x, w.t()))
    need = ctx.needs_input_grad
    grad_x = torch.matmul(gz, weight) if need[0] else None
    grad_w = torch.matmul(gz.reshape(-1, gz.shape[-1]).t(), x.reshape(-1, x.shape[-1])) if need[1] else None
    return grad_x, grad_w, grad_g, grad_gb, None, None, None, None


linear_fwd.register_autograd(_backward, setup_context=_setup)


# -------------------------------------------------------------------------------------------------- functional API
def wf_linear(x, weight, bias, alpha_weight, alpha_bias, rows, segments=None, path: str | None = None,
              gates=None, act: str = "none"):
    """Fused filtered linear on [B, ..., K]. ``rows``: validated int64 [B]; ``segments``: (perm, starts) of the rows
    or a callable returning them (built here when None; only used when a gate logit needs a gradient); ``path``
    None = ``dispatch.linear_path``. ``gates``: per-sample gates ``(g, gb)`` given directly (fp32 [B, C], e.g.
    composed for forget sets by ``wfnet.sets``, or folded with a BatchNorm by ``wfnet.fold``; their gradient flows
    back through autograd) in place of the rows; ``act``: an activation folded into the epilogue (wfnet.fold)."""
    b, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, k)
    if not x3.is_contiguous():
        x3 = x3.contiguous()
    if path is None:
        path = dispatch.linear_path((x3.shape[0] * x3.shape[1], k), weight, x.dtype)[0]
    g, gb = gates if gates is not None else sample_gates(alpha_weight, alpha_bias, bias, rows,
                                                         segments_fn(rows, alpha_weight.shape[0], segments))
    out, _ = torch.ops.wf_kernels.linear_fwd(x3, weight, g, gb, path, save_z_for_backward(g, act, gb, x3, weight),
                                             dot_precision("linear", x.dtype), act)
    return out.reshape(x.shape[:-1] + (weight.shape[0],))
