// Op registration for wfnet._C: schemas (TORCH_LIBRARY), CUDA implementations, input checks.
//
// Three ops, all in the `wfnet` namespace and prefixed `cuda_` so they never collide with ops other backends define
// from Python:
//   cuda_gate_epilogue(z, rows, alpha_weight, alpha_bias?, bias?, channel_dim, scale?, shift?, act) -> out
//   cuda_gate_epilogue_(z!, ...) -> ()          the same, in place on z (used when no gradient is needed)
//   cuda_gate_backward(grad_out, z?, rows, alpha_weight, alpha_bias?, bias?, channel_dim, need_grad_z,
//                      need_grad_alpha_weight, need_grad_alpha_bias, need_grad_bias, deterministic, scale?, shift?,
//                      act)
//       -> (grad_z, grad_alpha_weight, grad_alpha_bias, grad_bias)  (an output not asked for is an empty tensor)
// scale / shift (fp32 [C], both or neither; default none) and act (an activation code of wf_ops.h, default 0 = none)
// are the fold (wfnet.fold): out = act(scale * gated + shift). Their own gradients are not computed (the Python
// backend refuses a fold whose BatchNorm parameters need one).
// `channel_dim` is 1 for convolutions (z is [B, C, H, W], NCHW- or channels_last-contiguous) and -1 for linear
// layers (z is [B, ..., C], contiguous). The autograd formula and the fake (meta) kernels are registered from
// Python (wfnet/backends/cuda.py); the checks here turn misuse into errors a user can act on. Class-row ranges are
// validated in Python before the launch (the kernels only assert them).
//
// The module is a plain C extension (no pybind11): importing wfnet._C loads the library, whose static initialisers
// register the ops with the dispatcher.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "wf_ops.h"

namespace wfnet {
namespace {

bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the activations are on ",
              ref.device(), "; move all tensors of the layer to the same GPU");
}

// Validates z's layout for `channel_dim` and returns the [B, C, S] / [B, S, C] view of it (see wf_ops.h).
GateGeometry geometry_of(const char* op, const at::Tensor& z, int64_t channel_dim) {
  TORCH_CHECK(z.is_cuda(), op, ": expected CUDA tensors, got activations on ", z.device(),
              " (the cuda backend runs on GPUs only; use backend=\"torch\" on CPU)");
  TORCH_CHECK(is_activation_dtype(z.scalar_type()), op, ": activations must be float32, float16 or bfloat16, got ",
              z.scalar_type());
  TORCH_CHECK(z.dim() >= 2, op, ": expected activations with a batch and a channel dimension, got shape ",
              z.sizes());
  const int64_t last = z.dim() - 1;
  if (channel_dim < 0) channel_dim += z.dim();
  TORCH_CHECK(channel_dim == 1 || channel_dim == last, op, ": channel_dim must be 1 (convolution) or -1 (linear), "
              "got ", channel_dim, " for a ", z.dim(), "-d tensor");
  GateGeometry geo;
  geo.batch = z.size(0);
  geo.channels = z.size(channel_dim);
  geo.num_classes = 0;
  const int64_t per_sample = geo.batch * geo.channels;
  geo.spatial = per_sample == 0 ? 0 : z.numel() / per_sample;
  if (channel_dim == 1 && z.is_contiguous()) {
    geo.channels_inner = false;  // NCHW (or [B, C])
  } else if (channel_dim == last && z.is_contiguous()) {
    geo.channels_inner = true;  // [B, ..., C]
  } else if (channel_dim == 1 && z.dim() == 4 && z.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    geo.channels_inner = true;  // NHWC
  } else {
    TORCH_CHECK(false, op, ": activations must be contiguous (NCHW), channels_last (4-d, channel_dim=1) or "
                "contiguous with channels last (channel_dim=-1); got shape ", z.sizes(), " with strides ",
                z.strides(), ". Call .contiguous() first");
  }
  return geo;
}

void check_gates(const char* op, const at::Tensor& z, const GateGeometry& geo, const at::Tensor& rows,
                 const at::Tensor& alpha_weight, const std::optional<at::Tensor>& alpha_bias,
                 const std::optional<at::Tensor>& bias) {
  check_same_device(op, z, rows, "rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong, op, ": rows must be int64 class indices, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == geo.batch, op, ": rows must have shape [", geo.batch,
              "] (one class row per sample), got ", rows.sizes());
  TORCH_CHECK(rows.is_contiguous(), op, ": rows must be contiguous");
  check_same_device(op, z, alpha_weight, "alpha_weight");
  TORCH_CHECK(alpha_weight.scalar_type() == at::kFloat, op, ": alpha_weight (gate logits) must be float32, got ",
              alpha_weight.scalar_type());
  TORCH_CHECK(alpha_weight.dim() == 2 && alpha_weight.size(1) == geo.channels, op,
              ": alpha_weight must have shape [num_classes, ", geo.channels, "], got ", alpha_weight.sizes());
  TORCH_CHECK(alpha_weight.size(0) >= 1, op, ": alpha_weight needs at least one class row");
  TORCH_CHECK(alpha_weight.is_contiguous(), op, ": alpha_weight must be contiguous");
  if (alpha_bias.has_value()) {
    TORCH_CHECK(bias.has_value(), op, ": alpha_bias was given for a layer without bias");
    const at::Tensor& ab = *alpha_bias;
    check_same_device(op, z, ab, "alpha_bias");
    TORCH_CHECK(ab.scalar_type() == at::kFloat, op, ": alpha_bias (gate logits) must be float32, got ",
                ab.scalar_type());
    TORCH_CHECK(ab.sizes() == alpha_weight.sizes(), op, ": alpha_bias must have the shape of alpha_weight ",
                alpha_weight.sizes(), ", got ", ab.sizes());
    TORCH_CHECK(ab.is_contiguous(), op, ": alpha_bias must be contiguous");
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_device(op, z, b, "bias");
    TORCH_CHECK(b.scalar_type() == z.scalar_type(), op, ": bias must have the activation dtype ", z.scalar_type(),
                ", got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == geo.channels, op, ": bias must have shape [", geo.channels, "], got ",
                b.sizes());
    TORCH_CHECK(b.is_contiguous(), op, ": bias must be contiguous");
  }
}

GateGeometry checked_geometry(const char* op, const at::Tensor& z, const at::Tensor& rows,
                              const at::Tensor& alpha_weight, const std::optional<at::Tensor>& alpha_bias,
                              const std::optional<at::Tensor>& bias, int64_t channel_dim) {
  GateGeometry geo = geometry_of(op, z, channel_dim);
  check_gates(op, z, geo, rows, alpha_weight, alpha_bias, bias);
  geo.num_classes = alpha_weight.size(0);
  return geo;
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Checks the fold arguments and returns them as the kernels take them.
FoldArgs checked_fold(const char* op, const at::Tensor& z, const GateGeometry& geo,
                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t act) {
  TORCH_CHECK(act >= 0 && act < kActCount, op, ": act must be an activation code 0..", kActCount - 1, ", got ", act);
  TORCH_CHECK(scale.has_value() == shift.has_value(), op, ": scale and shift (a folded BatchNorm) come together");
  FoldArgs fold;
  fold.act = static_cast<int>(act);
  if (scale.has_value()) {
    for (const at::Tensor* t : {&*scale, &*shift}) {
      const char* name = t == &*scale ? "scale" : "shift";
      check_same_device(op, z, *t, name);
      TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      TORCH_CHECK(t->dim() == 1 && t->size(0) == geo.channels, op, ": ", name, " must have shape [", geo.channels,
                  "], got ", t->sizes());
      TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    }
    fold.scale = scale->data_ptr<float>();
    fold.shift = shift->data_ptr<float>();
  }
  return fold;
}

// perm [B] / starts [N_c + 1], int64, on the rows' device: the batch's class segments (wfnet.rows.Rows.segments).
void check_segments(const char* op, const at::Tensor& rows, const GateGeometry& geo,
                    const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& starts) {
  TORCH_CHECK(perm.has_value() && starts.has_value(), op,
              ": the deterministic class-row reduction needs the batch's class segments perm / starts "
              "(wfnet.rows.Rows.segments, or wf_kernels.gates.segments(rows, num_classes))");
  for (const auto& [name, t, len] : {std::tuple<const char*, const at::Tensor&, int64_t>{"perm", *perm, geo.batch},
                                     {"starts", *starts, geo.num_classes + 1}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == len && t.is_contiguous(), op, ": ",
                name, " must be a contiguous int64 tensor [", len, "], got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == rows.device(), op, ": ", name, " is on ", t.device(), ", rows on ", rows.device());
  }
}

at::Tensor gate_epilogue(const at::Tensor& z, const at::Tensor& rows, const at::Tensor& alpha_weight,
                         const std::optional<at::Tensor>& alpha_bias, const std::optional<at::Tensor>& bias,
                         int64_t channel_dim, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, int64_t act, const std::optional<at::Tensor>& perm,
                         const std::optional<at::Tensor>& starts) {
  const char* op = "wfnet::cuda_gate_epilogue";
  const GateGeometry geo = checked_geometry(op, z, rows, alpha_weight, alpha_bias, bias, channel_dim);
  const FoldArgs fold = checked_fold(op, z, geo, scale, shift, act);
  // perm / starts are not read here: the op takes them so that its autograd formula (wfnet/backends/cuda.py) hands
  // the batch's class segments to the backward; checked now so a bad pair fails at the forward
  if (perm.has_value() || starts.has_value()) check_segments(op, rows, geo, perm, starts);
  at::Tensor out = at::empty_like(z);  // keeps z's memory format (NCHW / channels_last)
  launch_gate_epilogue(z, out, rows, alpha_weight, value_or_undefined(alpha_bias), value_or_undefined(bias), fold,
                       geo);
  return out;
}

void gate_epilogue_(const at::Tensor& z, const at::Tensor& rows, const at::Tensor& alpha_weight,
                    const std::optional<at::Tensor>& alpha_bias, const std::optional<at::Tensor>& bias,
                    int64_t channel_dim, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift, int64_t act) {
  const char* op = "wfnet::cuda_gate_epilogue_";
  const GateGeometry geo = checked_geometry(op, z, rows, alpha_weight, alpha_bias, bias, channel_dim);
  const FoldArgs fold = checked_fold(op, z, geo, scale, shift, act);
  launch_gate_epilogue(z, z, rows, alpha_weight, value_or_undefined(alpha_bias), value_or_undefined(bias), fold, geo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& z, const at::Tensor& rows,
    const at::Tensor& alpha_weight, const std::optional<at::Tensor>& alpha_bias, const std::optional<at::Tensor>& bias,
    int64_t channel_dim, bool need_grad_z, bool need_grad_alpha_weight, bool need_grad_alpha_bias,
    bool need_grad_bias, bool deterministic, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, int64_t act, const std::optional<at::Tensor>& perm,
    const std::optional<at::Tensor>& starts) {
  const char* op = "wfnet::cuda_gate_backward";
  const GateGeometry geo = checked_geometry(op, grad_out, rows, alpha_weight, alpha_bias, bias, channel_dim);
  const FoldArgs fold = checked_fold(op, grad_out, geo, scale, shift, act);
  const bool folded = fold.scale != nullptr || fold.act != kActNone;
  TORCH_CHECK(!need_grad_alpha_weight || z.has_value(), op,
              ": the gradient of alpha_weight needs the saved bias-free output z");
  TORCH_CHECK(fold.act == kActNone || z.has_value(), op,
              ": the backward of a folded activation needs the saved bias-free output z (the pre-activation is "
              "recomputed from it)");
  TORCH_CHECK(!need_grad_alpha_bias || (alpha_bias.has_value() && bias.has_value()), op,
              ": the gradient of alpha_bias needs alpha_bias and bias");
  TORCH_CHECK(!need_grad_bias || bias.has_value(), op, ": the gradient of bias needs bias");
  if (z.has_value()) {
    check_same_device(op, grad_out, *z, "z");
    TORCH_CHECK(z->scalar_type() == grad_out.scalar_type(), op, ": grad_out (", grad_out.scalar_type(),
                ") and z (", z->scalar_type(), ") must have the same dtype");
    // Same sizes and the same layout kind imply the same element offsets (size-1 dims carry no offset).
    TORCH_CHECK(z->sizes() == grad_out.sizes() && geometry_of(op, *z, channel_dim).channels_inner == geo.channels_inner,
                op, ": grad_out and z must have the same shape and memory format, got ", grad_out.sizes(), "/",
                grad_out.strides(), " and ", z->sizes(), "/", z->strides());
  }
  const auto empty = [&](const at::TensorOptions& opts) { return at::empty({0}, opts); };
  const auto f32 = alpha_weight.options();

  at::Tensor grad_z = need_grad_z ? at::empty_like(grad_out) : empty(grad_out.options());
  const bool reduce = need_grad_alpha_weight || need_grad_alpha_bias || need_grad_bias;
  const at::Tensor zt = (need_grad_alpha_weight || fold.act != kActNone) ? *z : at::Tensor();
  const at::Tensor ab = value_or_undefined(alpha_bias);
  const at::Tensor b = value_or_undefined(bias);
  if (!reduce) {
    if (need_grad_z && !folded) {
      launch_gate_epilogue(grad_out, grad_z, rows, alpha_weight, at::Tensor(), at::Tensor(), FoldArgs(), geo);
    } else if (need_grad_z) {  // folded: grad_z needs act' and the scale; the reduction kernels, with no sums kept
      launch_gate_backward_reduce(grad_out, zt, grad_z, rows, alpha_weight, ab, b, at::Tensor(), at::Tensor(),
                                  at::Tensor(), at::Tensor(), false, fold, geo);
    }
    return {grad_z, empty(f32), empty(f32), empty(grad_out.options())};
  }
  const at::Tensor gz_out = need_grad_z ? grad_z : at::Tensor();
  // The bias gradient needs the per-sample sums, so it always takes the buffered path.
  const bool use_buffer = deterministic || need_grad_bias;
  at::Tensor grad_aw, grad_ab, grad_b;
  if (!use_buffer) {
    grad_aw = need_grad_alpha_weight ? at::zeros_like(alpha_weight) : at::Tensor();
    grad_ab = need_grad_alpha_bias ? at::zeros_like(alpha_weight) : at::Tensor();
    launch_gate_backward_reduce(grad_out, zt, gz_out, rows, alpha_weight, ab, b, grad_aw, grad_ab, at::Tensor(),
                                at::Tensor(), false, fold, geo);
  } else {
    const at::Tensor buf_gz = need_grad_alpha_weight ? at::empty({geo.batch, geo.channels}, f32) : at::Tensor();
    const at::Tensor buf_g =
        (need_grad_alpha_bias || need_grad_bias) ? at::empty({geo.batch, geo.channels}, f32) : at::Tensor();
    launch_gate_backward_reduce(grad_out, zt, gz_out, rows, alpha_weight, ab, b, at::Tensor(), at::Tensor(), buf_gz,
                                buf_g, true, fold, geo);
    if (need_grad_alpha_weight || need_grad_alpha_bias) {
      // The batch's class segments (a stable sort of the rows, made once per batch for every layer) fix the order
      // in which each class row's samples are summed.
      check_segments(op, rows, geo, perm, starts);
      if (need_grad_alpha_weight) {
        grad_aw = at::empty_like(alpha_weight);
        launch_segment_reduce(buf_gz, *perm, *starts, alpha_weight, at::Tensor(), grad_aw, geo);
      }
      if (need_grad_alpha_bias) {
        grad_ab = at::empty_like(alpha_weight);
        launch_segment_reduce(buf_g, *perm, *starts, ab, b.to(at::kFloat).contiguous(), grad_ab, geo);
      }
    }
    if (need_grad_bias) {
      // grad_b[c] = sum_n gate_b[n, c] * sum_s grad_out[n, c, s]; ATen's reductions here are deterministic.
      const at::Tensor per_sample = ab.defined() ? at::sigmoid(ab).index_select(0, rows).mul(buf_g) : buf_g;
      grad_b = per_sample.sum(0).to(b.scalar_type());
    }
  }
  return {grad_z, grad_aw.defined() ? grad_aw : empty(f32), grad_ab.defined() ? grad_ab : empty(f32),
          grad_b.defined() ? grad_b : empty(grad_out.options())};
}

}  // namespace
}  // namespace wfnet

TORCH_LIBRARY(wfnet, m) {
  m.def("cuda_gate_epilogue(Tensor z, Tensor rows, Tensor alpha_weight, Tensor? alpha_bias, Tensor? bias, "
        "int channel_dim, Tensor? scale=None, Tensor? shift=None, int act=0, Tensor? perm=None, "
        "Tensor? starts=None) -> Tensor");
  m.def("cuda_gate_epilogue_(Tensor(a!) z, Tensor rows, Tensor alpha_weight, Tensor? alpha_bias, Tensor? bias, "
        "int channel_dim, Tensor? scale=None, Tensor? shift=None, int act=0) -> ()");
  m.def("cuda_gate_backward(Tensor grad_out, Tensor? z, Tensor rows, Tensor alpha_weight, Tensor? alpha_bias, "
        "Tensor? bias, int channel_dim, bool need_grad_z, bool need_grad_alpha_weight, bool need_grad_alpha_bias, "
        "bool need_grad_bias, bool deterministic, Tensor? scale=None, Tensor? shift=None, int act=0, "
        "Tensor? perm=None, Tensor? starts=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(wfnet, CUDA, m) {
  m.impl("cuda_gate_epilogue", &wfnet::gate_epilogue);
  m.impl("cuda_gate_epilogue_", &wfnet::gate_epilogue_);
  m.impl("cuda_gate_backward", &wfnet::gate_backward);
}

// A minimal CPython module so that `import wfnet._C` loads this library (and runs the registrations above).
static struct PyModuleDef wfnet_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled CUDA ops of wfnet, registered as torch.ops.wfnet.cuda_* (see wfnet/backends/cuda.py).", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&wfnet_c_module); }
