"""The "cuda" backend: cuDNN / cuBLAS through ATen, then the compiled weight-filtering epilogue of ``wfnet._C``.

    z   = conv2d(x, W) / x @ W^T            (no bias; ATen picks cuDNN / cuBLAS)
    out = sigmoid(A_w[r_n]) * z + sigmoid(A_b[r_n]) * b      one fused pass (torch.ops.wfnet.cuda_gate_epilogue)
    out = act(s * out + t)                                   with the fold (wfnet.fold), in the same pass

Design:

* The compiled ops (csrc/) only cover the memory-bound epilogue and its backward; the GEMM / convolution stays in
  the vendor libraries. The autograd formula is registered on the epilogue op, so ATen's own conv / matmul autograd
  turns the fused ``grad_z = grad_out * gate`` into grad_input (conv-transpose / matmul, as
  ``torch.nn.grad.conv2d_input`` would) and, for a trainable weight, grad_weight. One fused backward pass over
  grad_out and z gives grad_z and the per-(sample, channel) sums behind grad_alpha_weight / grad_alpha_bias, which
  are scattered into the class rows with atomics, or, when ``torch.are_deterministic_algorithms_enabled()``, by a
  segmented reduction over the batch's class segments (``wfnet.rows.Rows.segments``: one stable sort per batch,
  shared by every layer and by the triton backend; the forward op takes them so its autograd formula can pass them on).
* z is saved for backward only when alpha_weight needs a gradient (the other gradients do not read it). When no
  gradient is needed at all (inference), the epilogue runs in place on the fresh conv / matmul output.
* Fake (meta) kernels are registered here with ``torch.library.register_fake`` so torch.compile can trace the ops;
  the C++ side checks devices, dtypes, shapes and layouts, while class-row ranges are validated by ``wfnet.ops``
  before any launch.

Importing this module fails with an ImportError carrying ``wfnet_hint`` (how to build the extension) when
``wfnet._C`` was not built; the backend registry reports it as the reason ``backend="cuda"`` cannot run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from wfnet import _C  # noqa: F401  (loading the library registers torch.ops.wfnet.cuda_*)
except ImportError as exc:
    _err = ImportError(f"the compiled extension wfnet._C is not available: {exc}")
    _err.wfnet_hint = (
        "build it on a machine with a CUDA-enabled torch and a CUDA toolkit (CUDA_HOME, or /usr/local/cuda): "
        "make sure WFNET_SKIP_CUDA_BUILD is unset, then run `pip install --no-build-isolation -e .` in the wfnet "
        "checkout"
    )
    raise _err from exc

__all__ = ["BACKEND", "CudaBackend", "OPS"]

OPS = ("cuda_gate_epilogue", "cuda_gate_epilogue_", "cuda_gate_backward")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.wfnet


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and memory formats of the outputs, for torch.compile and meta tensors.

# the fold's activation codes (csrc/wf_ops.h kAct*)
ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "hardswish": 5, "hardsigmoid": 6}


@torch.library.register_fake("wfnet::cuda_gate_epilogue")
def _epilogue_fake(z, rows, alpha_weight, alpha_bias, bias, channel_dim, scale=None, shift=None, act=0, perm=None,
                   starts=None):
    return torch.empty_like(z)  # same memory format as z, like the CUDA kernel's at::empty_like


@torch.library.register_fake("wfnet::cuda_gate_epilogue_")
def _epilogue_inplace_fake(z, rows, alpha_weight, alpha_bias, bias, channel_dim, scale=None, shift=None, act=0):
    return None


@torch.library.register_fake("wfnet::cuda_gate_backward")
def _backward_fake(grad_out, z, rows, alpha_weight, alpha_bias, bias, channel_dim, need_grad_z,
                   need_grad_alpha_weight, need_grad_alpha_bias, need_grad_bias, deterministic, scale=None,
                   shift=None, act=0, perm=None, starts=None):
    def empty(like):
        return like.new_empty((0,))

    return (
        torch.empty_like(grad_out) if need_grad_z else empty(grad_out),
        torch.empty_like(alpha_weight) if need_grad_alpha_weight else empty(alpha_weight),
        torch.empty_like(alpha_weight) if need_grad_alpha_bias else empty(alpha_weight),
        grad_out.new_empty((grad_out.shape[channel_dim],)) if need_grad_bias else empty(grad_out),
    )


# ---------------------------------------------------------------------------------------------------------------
# Autograd for the functional epilogue op. Inputs: (z, rows, alpha_weight, alpha_bias, bias, channel_dim, scale, shift,
# act, perm, starts); scale / shift (a folded BatchNorm's affine) get no gradient: the backend refuses a fold whose
# BatchNorm parameters need one (CudaBackend.unsupported); perm / starts are the batch's class segments.

def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    z, rows, alpha_weight, alpha_bias, bias, channel_dim, *rest = inputs
    # the schema's defaults for what was not passed
    scale, shift, act, perm, starts = tuple(rest) + (None, None, 0, None, None)[len(rest):]
    # z is read by grad_alpha_weight, and with a folded activation by every gradient (the pre-activation is
    # recomputed from it): do not keep the activation alive otherwise.
    keep_z = alpha_weight.requires_grad or act != 0
    ctx.save_for_backward(z if keep_z else None, rows, alpha_weight, alpha_bias, bias, scale, shift, perm, starts)
    ctx.act = act
    ctx.channel_dim = channel_dim
    ctx.memory_format = _memory_format(z) if channel_dim == 1 else torch.contiguous_format


def _backward(ctx, grad_out):
    z, rows, alpha_weight, alpha_bias, bias, scale, shift, perm, starts = ctx.saved_tensors
    act = ctx.act
    need_z, _, need_aw, need_ab, need_b = ctx.needs_input_grad[:5]
    need_ab = need_ab and alpha_bias is not None and bias is not None
    need_b = need_b and bias is not None
    none_fold = (None,) * (len(ctx.needs_input_grad) - 6)  # scale, shift, act, perm, starts: no gradient
    if not (need_z or need_aw or need_ab or need_b):
        return (None, None, None, None, None, None) + none_fold
    # The kernel reads grad_out with z's layout; the incoming gradient can have any strides (e.g. expanded).
    grad_out = grad_out.contiguous(memory_format=ctx.memory_format)
    grad_z, grad_aw, grad_ab, grad_b = _ops.cuda_gate_backward(
        grad_out, z if (need_aw or act != 0) else None, rows, alpha_weight, alpha_bias, bias, ctx.channel_dim, need_z,
        need_aw, need_ab, need_b, torch.are_deterministic_algorithms_enabled(), scale, shift, act, perm, starts)
    return (grad_z if need_z else None, None, grad_aw if need_aw else None, grad_ab if need_ab else None,
            grad_b if need_b else None, None) + none_fold


torch.library.register_autograd("wfnet::cuda_gate_epilogue", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# The backend.

def _gate_epilogue(z, bias, alpha_weight, alpha_bias, layer_rows, channel_dim: int, fold=None) -> torch.Tensor:
    """Gate the bias-free conv / matmul output ``z`` per sample and add the gated bias (then, with ``fold``, a
    ``wfnet.fold.Affine``: the folded BatchNorm's affine and activation). ``layer_rows`` is the layer's
    ``wfnet.rows.LayerRows``: its index, and its batch's class segments for a deterministic backward. ``channel_dim``
    is 1 for convolutions, -1 for linear layers. When no gradient is needed ``z`` is OVERWRITTEN (callers pass the
    fresh output of their conv / matmul)."""
    if channel_dim == 1 and z.dim() == 4:
        if not (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last)):
            z = z.contiguous()
    elif not z.is_contiguous():
        z = z.contiguous()
    # Gate logits are fp32 by design (layers keep them so); a model cast with .half() gets them converted here.
    alpha_weight = alpha_weight.float().contiguous()
    alpha_bias = None if alpha_bias is None else alpha_bias.float().contiguous()
    bias = None if bias is None else bias.to(z.dtype).contiguous()
    rows = layer_rows.index.contiguous()
    scale = shift = None
    act = 0
    if fold is not None:
        scale, shift = fold.scale.float().contiguous(), fold.shift.float().contiguous()
        act = ACT_CODES[fold.act]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (z, alpha_weight, alpha_bias, bias))
    if needs_grad:
        # the batch's class segments (one sort per batch, cached on the rows, shared by every layer): what a
        # deterministic backward sums the gate-logit gradients by (passed whenever those are needed, deterministic
        # mode or not: it may be switched on before the backward runs)
        gate_grads = alpha_weight.requires_grad or (alpha_bias is not None and alpha_bias.requires_grad)
        perm, starts = layer_rows.segments(alpha_weight.shape[0]) if gate_grads else (None, None)
        return _ops.cuda_gate_epilogue(z, rows, alpha_weight, alpha_bias, bias, channel_dim, scale, shift, act, perm,
                                       starts)
    # z is the fresh output of the conv / matmul above and nothing else refers to it: safe to overwrite.
    _ops.cuda_gate_epilogue_(z, rows, alpha_weight, alpha_bias, bias, channel_dim, scale, shift, act)
    return z


class CudaBackend:
    name = "cuda"
    # the compiled epilogue gathers the rows' gates itself, so it takes the fold (scale, shift, act) directly
    folds_rows = True

    def unsupported(self, op, x, weight, bias, alpha_weight, alpha_bias, rows, fold=None, **_):
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors, got the input on {x.device}")
        if x.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"input dtype {x.dtype} is not supported (float32, float16, bfloat16)")
        if weight.dtype != x.dtype:
            reasons.append(f"weight dtype {weight.dtype} differs from the input dtype {x.dtype}")
        for name, a in (("alpha_weight", alpha_weight), ("alpha_bias", alpha_bias)):
            if a is not None and not a.dtype.is_floating_point:
                reasons.append(f"{name} must be a floating-point tensor, got {a.dtype}")
        if bias is not None and not bias.dtype.is_floating_point:
            reasons.append(f"bias must be a floating-point tensor, got {bias.dtype}")
        if getattr(rows, "mask", None) is not None:
            # the compiled epilogue gathers sigmoid(alpha)[rows] itself and takes no per-sample gates; "auto" falls
            # back to triton / torch, which apply the composed gates
            reasons.append("forget sets (a class mask per sample) need per-sample composed gates, which the compiled "
                           "epilogue of wfnet._C does not take (it reads one class row per sample); use "
                           "backend='triton' or 'torch'")
        if fold is not None and torch.is_grad_enabled() and (fold.scale.requires_grad or fold.shift.requires_grad):
            reasons.append("a folded BatchNorm whose weight / bias need a gradient: the compiled epilogue gives the "
                           "gates' gradients only; use backend='triton' or 'torch' (or freeze the BatchNorm)")
        return reasons

    def conv2d(self, x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups, fold=None):
        z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return _gate_epilogue(z, bias, alpha_weight, alpha_bias, rows, channel_dim=1, fold=fold)

    def linear(self, x, weight, bias, alpha_weight, alpha_bias, rows, fold=None):
        z = F.linear(x, weight)
        return _gate_epilogue(z, bias, alpha_weight, alpha_bias, rows, channel_dim=-1, fold=fold)


BACKEND = CudaBackend()
