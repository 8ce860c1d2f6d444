"""The "triton" backend: wfnet's filtered conv / linear ops on the fused Triton kernels of ``wf_kernels``.

It runs CUDA tensors, and CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``wf_kernels`` is imported; tests do this in conftest.py). ``unsupported`` lists every reason it cannot take an input
(device, interpreter, dtype, mixed dtypes, int32 offset limits); what is merely routed elsewhere *inside* the backend
(grouped / depthwise convs to the cuDNN + epilogue path, bf16 linears under the interpreter to cuBLAS + epilogue) is
decided and explained by ``wf_kernels.dispatch`` (``wf_kernels.dispatch.last_decisions``).
"""
from __future__ import annotations

import torch

try:
    import wf_kernels.ops as _kops
    from wf_kernels.autotune import INTERPRET
    from wf_kernels.gates import sample_gates as _sample_gates
except ImportError as exc:  # no Triton on this platform: the registry reports this as the backend's reason
    exc.wfnet_hint = "install triton (Linux) to use the fused kernels"
    raise

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def _conv_out_numel(x, weight, stride, padding, dilation):
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return x.shape[0] * weight.shape[0] * max(ho, 0) * max(wo, 0)


class TritonBackend:
    name = "triton"

    def unsupported(self, op, x, weight, bias, alpha_weight, alpha_bias, rows, **conv):
        reasons = []
        dev = x.device.type
        if dev == "cpu":
            if not INTERPRET:
                reasons.append("tensors are on CPU and the Triton interpreter is off: set TRITON_INTERPRET=1 before "
                               "importing wfnet / wf_kernels to run the kernels on CPU (slow; for tests)")
        elif dev != "cuda":
            reasons.append(f"tensors are on {dev}; the Triton kernels run on CUDA devices (or CPU under "
                           f"TRITON_INTERPRET=1)")
        elif INTERPRET:
            reasons.append("TRITON_INTERPRET=1 was set when wf_kernels was imported: kernels are interpreted and "
                           "take CPU tensors only")
        if x.dtype not in _DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported (float32, float16, bfloat16)")
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            reasons.append(f"input dtype {x.dtype} differs from the layer's weight/bias dtype {weight.dtype}"
                           f"{'' if bias is None else '/' + str(bias.dtype)}; cast one of them (or use autocast)")
        if not alpha_weight.is_floating_point() or (alpha_bias is not None and not alpha_bias.is_floating_point()):
            reasons.append("gate logits must be floating point")
        out_numel = (_conv_out_numel(x, weight, conv["stride"], conv["padding"], conv["dilation"])
                     if op == "conv2d" else x.numel() // max(x.shape[-1], 1) * weight.shape[0])
        if max(x.numel(), out_numel, weight.numel()) >= _INT32_LIMIT:
            reasons.append("a tensor has 2**31 elements or more; the kernels use int32 offsets (split the batch)")
        if op == "conv2d" and weight.dim() != 4:
            reasons.append(f"conv2d weight must be 4-d, got {weight.dim()}-d")
        return reasons

    def conv2d(self, x, weight, bias, alpha_weight, alpha_bias, rows, stride, padding, dilation, groups):
        return _kops.wf_conv2d(x, weight, bias, alpha_weight, alpha_bias, rows.index, stride, padding, dilation, groups,
                               segments=rows.segments)

    def linear(self, x, weight, bias, alpha_weight, alpha_bias, rows):
        return _kops.wf_linear(x, weight, bias, alpha_weight, alpha_bias, rows.index, segments=rows.segments)

    def sample_gates(self, alpha_weight, alpha_bias, bias, rows):
        """The rows' gates as the fused kernels gather them (deterministic class reduction in the backward)."""
        return _sample_gates(alpha_weight, alpha_bias, bias, rows.index, rows.segments)

    # per-sample gates given directly (forget sets, and the fold: see wfnet.ops): the same fused kernels, which read
    # [B, C] gates; ``act``: an activation folded into their epilogue
    def conv2d_gates(self, x, weight, g, gb, stride, padding, dilation, groups, act="none"):
        return _kops.wf_conv2d(x, weight, None, None, None, None, stride, padding, dilation, groups,
                               gates=_fp32(g, gb), act=act)

    def linear_gates(self, x, weight, g, gb, act="none"):
        return _kops.wf_linear(x, weight, None, None, None, None, gates=_fp32(g, gb), act=act)


def _fp32(g, gb):
    """The kernels read fp32 gates, [B, C] with unit channel stride (g dense; gb may be a broadcast bias)."""
    return g.float().contiguous(), None if gb is None else gb.float()


BACKEND = TritonBackend()
