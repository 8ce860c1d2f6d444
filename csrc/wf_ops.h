// Shared declarations between the op registration (wf_ops.cpp, plain C++) and the CUDA kernels (wf_kernels.cu).
//
// Every tensor handed to a launcher has already been checked by wf_ops.cpp (device, dtype, shape, layout); an
// optional tensor that is absent is passed as an undefined at::Tensor.
#pragma once

#include <ATen/core/Tensor.h>

namespace wfnet {

// How a gated activation is laid out in memory. Both layouts are viewed as [batch, ..., channels] blocks of
// `spatial` positions per (sample, channel):
//   channels_inner = false: [B, C, S] (NCHW, or [B, C] for S = 1)     element (n, c, s) at (n * C + c) * S + s
//   channels_inner = true:  [B, S, C] (channels_last, linear tokens)  element (n, s, c) at (n * S + s) * C + c
struct GateGeometry {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  int64_t num_classes;
  bool channels_inner;
};

// Activation codes of the fold (the `act` argument of the ops; wfnet/backends/cuda.py maps the names).
constexpr int kActNone = 0;
constexpr int kActRelu = 1;
constexpr int kActRelu6 = 2;
constexpr int kActSilu = 3;
constexpr int kActGelu = 4;  // exact (erf) GELU
constexpr int kActHardswish = 5;
constexpr int kActHardsigmoid = 6;
constexpr int kActCount = 7;

// The fold (wfnet.fold): a following eval-mode BatchNorm's per-channel affine (scale, shift: fp32 [C], both null when
// no BatchNorm is folded) and an elementwise activation, applied after the gate: out = act(scale * y + shift).
struct FoldArgs {
  const float* scale = nullptr;
  const float* shift = nullptr;
  int act = kActNone;
};

// y = sigmoid(alpha_weight[rows[n], c]) * z + gate_b * bias[c], gate_b = sigmoid(alpha_bias[rows[n], c]) or 1 when
// alpha_bias is undefined; no bias term when bias is undefined; out = act(scale[c] * y + shift[c]) with the fold,
// else y. `out` may be `z` itself (in place).
void launch_gate_epilogue(const at::Tensor& z, const at::Tensor& out, const at::Tensor& rows,
                          const at::Tensor& alpha_weight, const at::Tensor& alpha_bias, const at::Tensor& bias,
                          const FoldArgs& fold, const GateGeometry& geo);

// One pass over grad_out (and z): with the fold, grad_out is first mapped to go = grad_out * act'(pre) * scale[c] (pre
// recomputed from z, which an activation therefore needs); then grad_z = go * sigmoid(alpha_weight[r_n]) is written
// when grad_z is defined, and, per (sample n, channel c), sum_s go * z (needs z) and sum_s go are reduced.
//   use_buffer = false: the sums are scaled by sigmoid' (and bias) and atomically added into the class rows of
//                       grad_alpha_weight / grad_alpha_bias (zero-initialised fp32 [N_c, C]).
//   use_buffer = true:  the raw sums are written to buf_gz / buf_g (fp32 [B, C]) for a deterministic reduction.
void launch_gate_backward_reduce(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& grad_z,
                                 const at::Tensor& rows, const at::Tensor& alpha_weight, const at::Tensor& alpha_bias,
                                 const at::Tensor& bias, const at::Tensor& grad_alpha_weight,
                                 const at::Tensor& grad_alpha_bias, const at::Tensor& buf_gz, const at::Tensor& buf_g,
                                 bool use_buffer, const FoldArgs& fold, const GateGeometry& geo);

// Deterministic per-class reduction: out[r, c] = sigmoid'(alpha[r, c]) * scale[c] * sum over samples n with
// rows[n] = r (in sorted order) of buf[n, c]. `perm` [B] / `starts` [N_c + 1] (int64) are the batch's class segments,
// built once per batch by wfnet.rows.Rows.segments and shared by every layer: class r's samples are
// perm[starts[r]:starts[r + 1]] in stable order. scale (fp32 [C]) may be undefined (= 1). Every entry of out is
// written, so it needs no initialisation.
void launch_segment_reduce(const at::Tensor& buf, const at::Tensor& perm, const at::Tensor& starts,
                           const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& out,
                           const GateGeometry& geo);

}  // namespace wfnet
