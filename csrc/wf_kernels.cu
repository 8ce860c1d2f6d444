// CUDA kernels of the "cuda" backend: the weight-filtering epilogue and its fused backward reduction.
//
// Design: the GEMM / convolution itself stays in cuBLAS / cuDNN (called through ATen by the Python backend); these
// kernels are the memory-bound pass that follows it. Per element (n, c, s) of the bias-free output z:
//
//   forward   y = sigmoid(A_w[r_n, c]) * z + sigmoid(A_b[r_n, c]) * b[c]
//             out = act(scale[c] * y + shift[c])      the fold (wfnet.fold): an eval-mode BatchNorm's affine and an
//                                                     elementwise activation; without it out = y
//   backward  go = grad_out * act'(scale[c] * y + shift[c]) * scale[c]   (y recomputed from z; go = grad_out unfolded)
//             grad_z = go * sigmoid(A_w[r_n, c])
//             gz[n, c] = sum_s go * z,  g[n, c] = sum_s go          (fp32 accumulators)
//             grad_A_w[r, c] += sigmoid'(A_w[r, c]) * gz[n, c]         for every n with r_n = r
//             grad_A_b[r, c] += sigmoid'(A_b[r, c]) * b[c] * g[n, c]
//
// The class-row scatter uses fp32 atomics by default; the deterministic variant writes gz / g to a [B, C] buffer and
// sums each class row's samples in a fixed (stably sorted) order. Gate logits are fp32, activations fp32/fp16/bf16
// with fp32 math. The elementwise kernel moves 16-byte vectors where the layout allows (scalar otherwise) and uses
// 32-bit indices when the tensor is small enough, 64-bit otherwise;
// the reductions always use 64-bit offsets (their cost is in the memory traffic, not the index arithmetic).
// Only light headers: ATen/cuda/CUDAContext.h would pull in cuBLAS / cuSPARSE headers that a minimal toolkit lacks.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "wf_ops.h"

// Only the three activation dtypes the backend supports: fewer template instantiations, shorter builds.
#define WF_DISPATCH_FLOATING(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace wfnet {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32;  // channels per block in the channels-inner reduction (one warp wide)
constexpr int kTileS = 8;   // positions per block step in the channels-inner reduction

__device__ __forceinline__ float sigmoid_f(float a) { return 1.f / (1.f + __expf(-a)); }

// ------------------------------------------------------------------------------------------------------------------
// The folded BatchNorm affine and activation (codes: wf_ops.h, FoldArgs). Full-precision expf / erff: these match
// torch's activations, where the gate's fast __expf only feeds a value in (0, 1).
__device__ __forceinline__ float act_forward(float x, int act) {
  switch (act) {
    case kActRelu: return fmaxf(x, 0.f);
    case kActRelu6: return fminf(fmaxf(x, 0.f), 6.f);
    case kActSilu: return x / (1.f + expf(-x));
    case kActGelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case kActHardswish: return x * fminf(fmaxf(x + 3.f, 0.f), 6.f) / 6.f;
    case kActHardsigmoid: return fminf(fmaxf(x + 3.f, 0.f), 6.f) / 6.f;
    default: return x;
  }
}

// d act / d x at the pre-activation x, with torch's conventions at the kinks (threshold_backward, hardtanh_backward,
// hardswish_backward, hardsigmoid_backward).
__device__ __forceinline__ float act_grad(float x, int act) {
  switch (act) {
    case kActRelu: return x > 0.f ? 1.f : 0.f;
    case kActRelu6: return (x > 0.f && x < 6.f) ? 1.f : 0.f;
    case kActSilu: {
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f + x * (1.f - s));
    }
    case kActGelu:
      return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
    case kActHardswish: return x < -3.f ? 0.f : (x <= 3.f ? x / 3.f + 0.5f : 1.f);
    case kActHardsigmoid: return (x > -3.f && x < 3.f) ? 1.f / 6.f : 0.f;
    default: return 1.f;
  }
}

// act(scale[c] * v + shift[c]); scale / shift are null without a folded BatchNorm.
__device__ __forceinline__ float fold_forward(float v, int64_t c, const FoldArgs& f) {
  if (f.scale != nullptr) v = v * f.scale[c] + f.shift[c];
  return act_forward(v, f.act);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

int64_t sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int64_t grid_for(int64_t work_items, int64_t per_sm) {
  const int64_t sms = sm_count();
  return std::max<int64_t>(1, std::min<int64_t>(work_items, sms * per_sm));
}

// ------------------------------------------------------------------------------------------------------------------
// Sample n and channel c of flat element i: channels-inner (channels_last / linear [M, C]) or channels-outer (NCHW).
template <bool kChannelsInner, typename index_t>
__device__ __forceinline__ void locate(index_t i, index_t channels, index_t spatial, index_t& n, index_t& c) {
  if (kChannelsInner) {
    c = i % channels;
    n = i / (channels * spatial);
  } else {
    const index_t plane = i / spatial;
    c = plane % channels;
    n = plane / channels;
  }
}

// Forward epilogue (also computes grad_z = grad_out * gate when called without bias).
// z and out may alias (in-place launch), so they are not __restrict__.
template <typename scalar_t, typename index_t, bool kChannelsInner>
__global__ void gate_epilogue_kernel(const scalar_t* z, scalar_t* out, const int64_t* __restrict__ rows,
                                     const float* __restrict__ alpha_w, const float* __restrict__ alpha_b,
                                     const scalar_t* __restrict__ bias, FoldArgs fold, index_t numel,
                                     index_t channels, index_t spatial, int64_t num_classes) {
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    index_t n, c;
    locate<kChannelsInner>(i, channels, spatial, n, c);
    const int64_t r = rows[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_classes);
    const int64_t k = r * static_cast<int64_t>(channels) + c;
    float v = sigmoid_f(alpha_w[k]) * static_cast<float>(z[i]);
    if (bias != nullptr) {
      const float gate_b = alpha_b != nullptr ? sigmoid_f(alpha_b[k]) : 1.f;
      v += gate_b * static_cast<float>(bias[c]);
    }
    out[i] = static_cast<scalar_t>(fold_forward(v, c, fold));
  }
}

// Vectorised variant: 16-byte loads and stores of kVec consecutive elements, used when every vector stays inside one
// (sample, channel) plane (channels-outer, spatial % kVec == 0) or one sample's channel run (channels-inner,
// channels % kVec == 0), and the pointers are 16-byte aligned. Low-precision element streams reach a much larger
// share of the memory bandwidth this way than with 2-byte accesses.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Packed {
  scalar_t v[kVec];
};

template <typename scalar_t, typename index_t, bool kChannelsInner, int kVec>
__global__ void gate_epilogue_vec_kernel(const scalar_t* z, scalar_t* out, const int64_t* __restrict__ rows,
                                         const float* __restrict__ alpha_w, const float* __restrict__ alpha_b,
                                         const scalar_t* __restrict__ bias, FoldArgs fold, index_t num_vecs,
                                         index_t channels, index_t spatial, int64_t num_classes) {
  using P = Packed<scalar_t, kVec>;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t vi = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; vi < num_vecs; vi += step) {
    const index_t i0 = vi * kVec;
    index_t n, c0;
    locate<kChannelsInner>(i0, channels, spatial, n, c0);
    const int64_t r = rows[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_classes);
    const int64_t k0 = r * static_cast<int64_t>(channels) + c0;
    const P in = reinterpret_cast<const P*>(z)[vi];
    P res;
    if (kChannelsInner) {  // consecutive channels: one gate per element
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float v = sigmoid_f(alpha_w[k0 + j]) * static_cast<float>(in.v[j]);
        if (bias != nullptr) {
          const float gate_b = alpha_b != nullptr ? sigmoid_f(alpha_b[k0 + j]) : 1.f;
          v += gate_b * static_cast<float>(bias[c0 + j]);
        }
        res.v[j] = static_cast<scalar_t>(fold_forward(v, c0 + j, fold));
      }
    } else {  // one plane: a single gate and gated bias (and folded affine) for the whole vector
      float gate = sigmoid_f(alpha_w[k0]);
      float shift = 0.f;
      if (bias != nullptr) shift = (alpha_b != nullptr ? sigmoid_f(alpha_b[k0]) : 1.f) * static_cast<float>(bias[c0]);
      if (fold.scale != nullptr) {  // scale * (gate * z + shift) + t = (scale * gate) * z + (scale * shift + t)
        const float s = fold.scale[c0];
        gate *= s;
        shift = shift * s + fold.shift[c0];
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        res.v[j] = static_cast<scalar_t>(act_forward(gate * static_cast<float>(in.v[j]) + shift, fold.act));
    }
    reinterpret_cast<P*>(out)[vi] = res;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward reduction. `finalize` is called by one thread per (n, c) with the two fp32 sums.
struct ReduceOut {
  const float* alpha_w;
  const float* alpha_b;
  float* grad_alpha_w;  // atomic mode
  float* grad_alpha_b;
  float* buf_gz;  // buffer mode
  float* buf_g;
  bool use_buffer;
  bool need_gz;  // sum of grad_out * z wanted (grad of alpha_weight)
  bool need_g;   // sum of grad_out wanted (grad of alpha_bias / bias)
  FoldArgs fold;  // the folded affine / activation (scale null and act kActNone when unfolded)
};

// grad_out -> go (see the header comment): the folded activation's derivative at the recomputed pre-activation, then
// the folded scale. `zv` is read only with an activation; `gate` / `bias_term` are this (n, c)'s gate and gated bias.
__device__ __forceinline__ float fold_grad(float go, float zv, float gate, float bias_term, int64_t c,
                                           const FoldArgs& f) {
  const float s = f.scale != nullptr ? f.scale[c] : 1.f;
  if (f.act != kActNone) {
    const float t = f.scale != nullptr ? f.shift[c] : 0.f;
    go *= act_grad((gate * zv + bias_term) * s + t, f.act);
  }
  return go * s;
}

template <typename scalar_t>
__device__ __forceinline__ float gated_bias_term(const ReduceOut& o, const scalar_t* bias, int64_t k, int64_t c) {
  if (bias == nullptr) return 0.f;
  return (o.alpha_b != nullptr ? sigmoid_f(o.alpha_b[k]) : 1.f) * static_cast<float>(bias[c]);
}

template <typename scalar_t>
__device__ __forceinline__ void finalize(const ReduceOut& o, const scalar_t* bias, int64_t n, int64_t c, int64_t r,
                                         int64_t channels, float gz, float g) {
  if (o.use_buffer) {
    if (o.need_gz) o.buf_gz[n * channels + c] = gz;
    if (o.need_g) o.buf_g[n * channels + c] = g;
    return;
  }
  const int64_t k = r * channels + c;
  if (o.grad_alpha_w != nullptr) {
    const float s = sigmoid_f(o.alpha_w[k]);
    atomicAdd(o.grad_alpha_w + k, gz * s * (1.f - s));
  }
  if (o.grad_alpha_b != nullptr) {
    const float s = sigmoid_f(o.alpha_b[k]);
    atomicAdd(o.grad_alpha_b + k, g * static_cast<float>(bias[c]) * s * (1.f - s));
  }
}

// Layout [B, C, S]: one block per (n, c) plane, the plane is contiguous.
template <typename scalar_t>
__global__ void gate_backward_outer_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                                           scalar_t* __restrict__ grad_z, const int64_t* __restrict__ rows,
                                           const scalar_t* __restrict__ bias, ReduceOut o, int64_t batch,
                                           int64_t channels, int64_t spatial, int64_t num_classes) {
  __shared__ float sh_gz[32];
  __shared__ float sh_g[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  for (int64_t plane = blockIdx.x; plane < batch * channels; plane += gridDim.x) {
    const int64_t n = plane / channels;
    const int64_t c = plane - n * channels;
    const int64_t r = rows[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_classes);
    const float gate = sigmoid_f(o.alpha_w[r * channels + c]);
    const bool folded = o.fold.scale != nullptr || o.fold.act != kActNone;
    const float bias_term = folded ? gated_bias_term(o, bias, r * channels + c, c) : 0.f;
    const bool read_z = o.need_gz || o.fold.act != kActNone;
    const int64_t base = plane * spatial;
    float acc_gz = 0.f, acc_g = 0.f;
    for (int64_t s = threadIdx.x; s < spatial; s += blockDim.x) {
      const float zv = read_z ? static_cast<float>(z[base + s]) : 0.f;
      float go = static_cast<float>(grad_out[base + s]);
      if (folded) go = fold_grad(go, zv, gate, bias_term, c, o.fold);
      if (o.need_gz) acc_gz += go * zv;
      acc_g += go;
      if (grad_z != nullptr) grad_z[base + s] = static_cast<scalar_t>(go * gate);
    }
    acc_gz = warp_sum(acc_gz);
    acc_g = warp_sum(acc_g);
    if (lane == 0) {
      sh_gz[warp] = acc_gz;
      sh_g[warp] = acc_g;
    }
    __syncthreads();
    if (warp == 0) {
      acc_gz = warp_sum(lane < num_warps ? sh_gz[lane] : 0.f);
      acc_g = warp_sum(lane < num_warps ? sh_g[lane] : 0.f);
      if (lane == 0) finalize(o, bias, n, c, r, channels, acc_gz, acc_g);
    }
    __syncthreads();  // the shared slots are reused by the next plane
  }
}

// Layout [B, S, C]: a block of (kTileC x kTileS) threads covers 32 consecutive channels of one sample (coalesced
// along c) and strides over the positions; the kTileS partial sums are combined in shared memory.
template <typename scalar_t>
__global__ void gate_backward_inner_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ z,
                                           scalar_t* __restrict__ grad_z, const int64_t* __restrict__ rows,
                                           const scalar_t* __restrict__ bias, ReduceOut o, int64_t batch,
                                           int64_t channels, int64_t spatial, int64_t num_classes) {
  __shared__ float sh_gz[kTileS][kTileC + 1];
  __shared__ float sh_g[kTileS][kTileC + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c_tiles = (channels + kTileC - 1) / kTileC;
  for (int64_t tile = blockIdx.x; tile < batch * c_tiles; tile += gridDim.x) {
    const int64_t n = tile / c_tiles;
    const int64_t c = (tile - n * c_tiles) * kTileC + tx;
    const int64_t r = rows[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_classes);
    float acc_gz = 0.f, acc_g = 0.f;
    if (c < channels) {
      const float gate = sigmoid_f(o.alpha_w[r * channels + c]);
      const bool folded = o.fold.scale != nullptr || o.fold.act != kActNone;
      const float bias_term = folded ? gated_bias_term(o, bias, r * channels + c, c) : 0.f;
      const bool read_z = o.need_gz || o.fold.act != kActNone;
      for (int64_t s = ty; s < spatial; s += kTileS) {
        const int64_t idx = (n * spatial + s) * channels + c;
        const float zv = read_z ? static_cast<float>(z[idx]) : 0.f;
        float go = static_cast<float>(grad_out[idx]);
        if (folded) go = fold_grad(go, zv, gate, bias_term, c, o.fold);
        if (o.need_gz) acc_gz += go * zv;
        acc_g += go;
        if (grad_z != nullptr) grad_z[idx] = static_cast<scalar_t>(go * gate);
      }
    }
    sh_gz[ty][tx] = acc_gz;
    sh_g[ty][tx] = acc_g;
    __syncthreads();
    if (ty == 0 && c < channels) {
      float gz = 0.f, g = 0.f;
#pragma unroll
      for (int j = 0; j < kTileS; ++j) {
        gz += sh_gz[j][tx];
        g += sh_g[j][tx];
      }
      finalize(o, bias, n, c, r, channels, gz, g);
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Deterministic class-row reduction over the batch's class segments (perm / starts: a stable sort of the rows, made
// once per batch for every layer by wfnet.rows.Rows.segments): one thread per (class row, channel) sums its row's
// samples in sorted-sample order. No atomics, no host synchronisation.
__global__ void segment_reduce_kernel(const float* __restrict__ buf, const int64_t* __restrict__ perm,
                                      const int64_t* __restrict__ starts, const float* __restrict__ alpha,
                                      const float* __restrict__ scale, float* __restrict__ out,
                                      int64_t channels, int64_t num_classes) {
  const int64_t total = num_classes * channels;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t r = idx / channels;
    const int64_t c = idx - r * channels;
    const int64_t lo = starts[r];
    const int64_t hi = starts[r + 1];
    float acc = 0.f;
    for (int64_t i = lo; i < hi; ++i) acc += buf[perm[i] * channels + c];
    const float s = sigmoid_f(alpha[idx]);
    out[idx] = acc * s * (1.f - s) * (scale != nullptr ? scale[c] : 1.f);
  }
}

template <typename scalar_t, typename index_t>
void launch_epilogue_typed(const at::Tensor& z, const at::Tensor& out, const at::Tensor& rows,
                           const at::Tensor& alpha_weight, const at::Tensor& alpha_bias, const at::Tensor& bias,
                           const FoldArgs& fold, const GateGeometry& geo, int64_t numel, int64_t grid) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const float* awp = alpha_weight.data_ptr<float>();
  const float* abp = ptr_or_null<float>(alpha_bias);
  const scalar_t* bp = ptr_or_null<scalar_t>(bias);
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(zp) % 16 == 0 && reinterpret_cast<uintptr_t>(op) % 16 == 0;
  if (aligned && (geo.channels_inner ? geo.channels : geo.spatial) % kVec == 0) {
    const int64_t num_vecs = numel / kVec;
    const int64_t vgrid = grid_for((num_vecs + kThreads - 1) / kThreads, 16);
    if (geo.channels_inner) {
      gate_epilogue_vec_kernel<scalar_t, index_t, true, kVec><<<vgrid, kThreads, 0, stream>>>(
          zp, op, rp, awp, abp, bp, fold, static_cast<index_t>(num_vecs), static_cast<index_t>(geo.channels),
          static_cast<index_t>(geo.spatial), geo.num_classes);
    } else {
      gate_epilogue_vec_kernel<scalar_t, index_t, false, kVec><<<vgrid, kThreads, 0, stream>>>(
          zp, op, rp, awp, abp, bp, fold, static_cast<index_t>(num_vecs), static_cast<index_t>(geo.channels),
          static_cast<index_t>(geo.spatial), geo.num_classes);
    }
  } else if (geo.channels_inner) {
    gate_epilogue_kernel<scalar_t, index_t, true><<<grid, kThreads, 0, stream>>>(
        zp, op, rp, awp, abp, bp, fold, static_cast<index_t>(numel), static_cast<index_t>(geo.channels),
        static_cast<index_t>(geo.spatial), geo.num_classes);
  } else {
    gate_epilogue_kernel<scalar_t, index_t, false><<<grid, kThreads, 0, stream>>>(
        zp, op, rp, awp, abp, bp, fold, static_cast<index_t>(numel), static_cast<index_t>(geo.channels),
        static_cast<index_t>(geo.spatial), geo.num_classes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_gate_epilogue(const at::Tensor& z, const at::Tensor& out, const at::Tensor& rows,
                          const at::Tensor& alpha_weight, const at::Tensor& alpha_bias, const at::Tensor& bias,
                          const FoldArgs& fold, const GateGeometry& geo) {
  const int64_t numel = z.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t grid = grid_for((numel + kThreads - 1) / kThreads, 16);
  // 32-bit indices only when the last grid-stride increment cannot overflow them either.
  const bool small = numel + grid * kThreads <= std::numeric_limits<int32_t>::max();
  WF_DISPATCH_FLOATING(z.scalar_type(), "wfnet_gate_epilogue", [&] {
    if (small) {
      launch_epilogue_typed<scalar_t, int32_t>(z, out, rows, alpha_weight, alpha_bias, bias, fold, geo, numel, grid);
    } else {
      launch_epilogue_typed<scalar_t, int64_t>(z, out, rows, alpha_weight, alpha_bias, bias, fold, geo, numel, grid);
    }
  });
}

void launch_gate_backward_reduce(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& grad_z,
                                 const at::Tensor& rows, const at::Tensor& alpha_weight, const at::Tensor& alpha_bias,
                                 const at::Tensor& bias, const at::Tensor& grad_alpha_weight,
                                 const at::Tensor& grad_alpha_bias, const at::Tensor& buf_gz, const at::Tensor& buf_g,
                                 bool use_buffer, const FoldArgs& fold, const GateGeometry& geo) {
  if (geo.batch == 0 || geo.channels == 0) return;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ReduceOut o;
  o.alpha_w = alpha_weight.data_ptr<float>();
  o.alpha_b = ptr_or_null<float>(alpha_bias);
  o.grad_alpha_w = use_buffer ? nullptr : mut_ptr_or_null<float>(grad_alpha_weight);
  o.grad_alpha_b = use_buffer ? nullptr : mut_ptr_or_null<float>(grad_alpha_bias);
  o.buf_gz = use_buffer ? mut_ptr_or_null<float>(buf_gz) : nullptr;
  o.buf_g = use_buffer ? mut_ptr_or_null<float>(buf_g) : nullptr;
  o.use_buffer = use_buffer;
  o.need_gz = use_buffer ? buf_gz.defined() : grad_alpha_weight.defined();
  o.need_g = use_buffer ? buf_g.defined() : grad_alpha_bias.defined();
  o.fold = fold;
  WF_DISPATCH_FLOATING(grad_out.scalar_type(), "wfnet_gate_backward", [&] {
    const scalar_t* gop = grad_out.data_ptr<scalar_t>();
    const scalar_t* zp = ptr_or_null<scalar_t>(z);
    scalar_t* gzp = mut_ptr_or_null<scalar_t>(grad_z);
    const int64_t* rp = rows.data_ptr<int64_t>();
    const scalar_t* bp = ptr_or_null<scalar_t>(bias);
    if (geo.channels_inner) {
      const int64_t tiles = geo.batch * ((geo.channels + kTileC - 1) / kTileC);
      const dim3 block(kTileC, kTileS);
      gate_backward_inner_kernel<scalar_t><<<grid_for(tiles, 8), block, 0, stream>>>(
          gop, zp, gzp, rp, bp, o, geo.batch, geo.channels, geo.spatial, geo.num_classes);
    } else {
      // Small planes (e.g. 7x7) would leave most of a 256-thread block idle: size the block to the plane.
      int threads = 32;
      while (threads < kThreads && threads < geo.spatial) threads <<= 1;
      gate_backward_outer_kernel<scalar_t><<<grid_for(geo.batch * geo.channels, 2048 / threads), threads, 0,
                                             stream>>>(gop, zp, gzp, rp, bp, o, geo.batch, geo.channels,
                                                       geo.spatial, geo.num_classes);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_segment_reduce(const at::Tensor& buf, const at::Tensor& perm, const at::Tensor& starts,
                           const at::Tensor& alpha, const at::Tensor& scale, const at::Tensor& out,
                           const GateGeometry& geo) {
  const int64_t total = geo.num_classes * geo.channels;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  segment_reduce_kernel<<<grid_for((total + kThreads - 1) / kThreads, 16), kThreads, 0, stream>>>(
      buf.data_ptr<float>(), perm.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), alpha.data_ptr<float>(),
      ptr_or_null<float>(scale), out.data_ptr<float>(), geo.channels, geo.num_classes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace wfnet
