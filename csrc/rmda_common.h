// Shared by the CPU and CUDA kernels of rmda_fused::rmda_step_, rmda_partials_, rmda_apply_
// and nonfinite_ (see csrc/bindings.cpp for the schemas and docs/algorithm.md, "The update",
// for the update). Only argument checks and the group-view decoding live here, so the two
// devices cannot disagree about what a valid call is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace rmda_fused {

// Per-tensor (outer, groups, inner) view of a tensor's dense memory; group g is view[:, g, :].
// Built in Python by rmda_fused.grouping (the one place that knows the groupings) and handed
// to the op as a flat int list of triples; an empty list means grouping 'none' (no prox).
struct GroupView {
  int64_t outer;
  int64_t groups;
  int64_t inner;
  int64_t group_size() const { return outer * inner; }
};

inline GroupView view_of(at::IntArrayRef views, size_t i) {
  return GroupView{views[3 * i], views[3 * i + 1], views[3 * i + 2]};
}

// The state dtype (docs/algorithm.md, "Numerics"): fp64 for fp64 params, fp32 for the rest.
inline at::ScalarType state_dtype(at::ScalarType param) {
  return param == at::kDouble ? at::kDouble : at::kFloat;
}

// The checks of parameter i that every op makes: its device and dtype; the dtype, device,
// size and memory layout of its companions (grad and initial in its dtype, dual in the state
// dtype); its one-element state (step, alpha) in the state dtype on its device. `op` names
// the op in the messages; grad and alpha are null for an op that takes none (rmda_apply_).
inline void check_parameter(const char* op, size_t i, const at::Tensor& p,
                            const at::Tensor* grad, const at::Tensor& initial,
                            const at::Tensor& dual, const at::Tensor& step,
                            const at::Tensor* alpha, at::DeviceType device_type) {
  TORCH_CHECK(p.device().type() == device_type, op, ": parameter ", i, " is on ", p.device(),
              ", this kernel runs on ", device_type);
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": parameter ", i,
              " is not floating point");
  const auto state_type = state_dtype(p.scalar_type());
  TORCH_CHECK((!grad || grad->scalar_type() == p.scalar_type()) &&
                  initial.scalar_type() == p.scalar_type(),
              op, ": ", grad ? "grad and initial" : "initial", " of parameter ", i,
              " must have its dtype ", p.scalar_type());
  TORCH_CHECK(dual.scalar_type() == state_type && step.scalar_type() == state_type &&
                  (!alpha || alpha->scalar_type() == state_type),
              op, ": ", alpha ? "dual, step and alpha" : "dual and step", " of parameter ", i,
              " must be ", state_type);
  for (const at::Tensor* t : {&p, grad, &initial, &dual}) {
    if (!t) continue;
    TORCH_CHECK(t->device() == p.device(), op, ": tensors of parameter ", i,
                " are on different devices");
    // the kernels walk memory: a dense layout (contiguous or permuted, e.g. channels_last)
    // shared by all four tensors, over which the caller expressed the group view
    TORCH_CHECK(t->is_non_overlapping_and_dense() && t->strides() == p.strides(), op,
                ": tensors of parameter ", i, " must share one dense memory "
                "layout (the group view is defined over it)");
    TORCH_CHECK(t->numel() == p.numel(), op, ": tensors of parameter ", i,
                " differ in size");
  }
  TORCH_CHECK(step.numel() == 1 && step.device() == p.device() &&
                  (!alpha || (alpha->numel() == 1 && alpha->device() == p.device())),
              op, ": ", alpha ? "step and alpha" : "step", " of parameter ", i,
              " must be one-element tensors on its device");
}

// The (outer, groups, inner) view of parameter i, checked to cover it.
inline GroupView checked_view(const char* op, at::IntArrayRef views, size_t i,
                              const at::Tensor& p) {
  const GroupView view = view_of(views, i);
  TORCH_CHECK(view.outer >= 0 && view.groups >= 0 && view.inner >= 0 &&
                  view.outer * view.groups * view.inner == p.numel(),
              op, ": view (", view.outer, ", ", view.groups, ", ", view.inner,
              ") does not cover parameter ", i, " of ", p.numel(), " elements");
  return view;
}

// A per-group tensor of parameter i (`what`: zero_groups, partials, scales): contiguous,
// one entry of `dtype` per group of its view, on its device.
inline void check_per_group(const char* op, const char* what, size_t i, const at::Tensor& t,
                            at::ScalarType dtype, const GroupView& view,
                            const at::Tensor& p) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == view.groups &&
                  t.device() == p.device(),
              op, ": ", what, " of parameter ", i, " must be a contiguous ", dtype,
              " tensor of ", view.groups, " entries on its device");
}

// lr_tensor, grad_scale and found_inf (whichever the op takes; unset ones are skipped).
inline void check_device_scalars(const char* op,
                                 std::initializer_list<const std::optional<at::Tensor>*> scalars,
                                 at::TensorList params, at::DeviceType device_type) {
  for (const auto* scalar : scalars) {
    if (scalar->has_value()) {
      TORCH_CHECK((*scalar)->numel() == 1, op, ": lr_tensor, grad_scale and found_inf "
                  "must have one element");
      TORCH_CHECK(params.empty() || device_type == at::kCPU ||
                      (*scalar)->device() == params[0].device(),
                  op, ": lr_tensor, grad_scale and found_inf must be on the "
                  "parameters' device");
    }
  }
}

inline void check_step_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList initials,
    at::TensorList duals,
    at::TensorList steps,
    at::TensorList alphas,
    at::TensorList zero_groups,
    at::IntArrayRef views,
    const std::optional<at::Tensor>& lr_tensor,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    at::DeviceType device_type) {
  constexpr const char* op = "rmda_step_";
  const size_t num_params = params.size();
  TORCH_CHECK(grads.size() == num_params && initials.size() == num_params &&
                  duals.size() == num_params && steps.size() == num_params &&
                  alphas.size() == num_params,
              op, ": every tensor list needs one entry per parameter");
  const bool prox = !views.empty();
  TORCH_CHECK(!prox || (views.size() == 3 * num_params && zero_groups.size() == num_params),
              op, ": views must hold 3 ints and zero_groups one mask per parameter "
              "(or both be empty for grouping 'none')");
  TORCH_CHECK(prox || zero_groups.empty(), op, ": zero_groups given without views");
  for (size_t i = 0; i < num_params; ++i) {
    check_parameter(op, i, params[i], &grads[i], initials[i], duals[i], steps[i], &alphas[i],
                    device_type);
    if (prox) {
      check_per_group(op, "zero_groups", i, zero_groups[i], at::kBool,
                      checked_view(op, views, i, params[i]), params[i]);
    }
  }
  check_device_scalars(op, {&lr_tensor, &grad_scale, &found_inf}, params, device_type);
}

// The coupled-group phases (bindings.cpp): every tensor has a view and one state-dtype
// entry per group in partials (written) or scales (read).
inline void check_partials_args(at::TensorList params, at::TensorList grads,
                                at::TensorList initials, at::TensorList duals,
                                at::TensorList steps, at::TensorList alphas,
                                at::TensorList partials, at::IntArrayRef views,
                                const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf,
                                at::DeviceType device_type) {
  constexpr const char* op = "rmda_partials_";
  const size_t num_params = params.size();
  TORCH_CHECK(grads.size() == num_params && initials.size() == num_params &&
                  duals.size() == num_params && steps.size() == num_params &&
                  alphas.size() == num_params && partials.size() == num_params &&
                  views.size() == 3 * num_params,
              op, ": every tensor list needs one entry and views 3 ints per parameter");
  for (size_t i = 0; i < num_params; ++i) {
    const at::Tensor& p = params[i];
    check_parameter(op, i, p, &grads[i], initials[i], duals[i], steps[i], &alphas[i],
                    device_type);
    check_per_group(op, "partials", i, partials[i], state_dtype(p.scalar_type()),
                    checked_view(op, views, i, p), p);
  }
  check_device_scalars(op, {&lr_tensor, &grad_scale, &found_inf}, params, device_type);
}

inline void check_apply_args(at::TensorList params, at::TensorList initials,
                             at::TensorList duals, at::TensorList steps,
                             at::TensorList scales, at::IntArrayRef views,
                             const std::optional<at::Tensor>& found_inf,
                             at::DeviceType device_type) {
  constexpr const char* op = "rmda_apply_";
  const size_t num_params = params.size();
  TORCH_CHECK(initials.size() == num_params && duals.size() == num_params &&
                  steps.size() == num_params && scales.size() == num_params &&
                  views.size() == 3 * num_params,
              op, ": every tensor list needs one entry and views 3 ints per parameter");
  for (size_t i = 0; i < num_params; ++i) {
    const at::Tensor& p = params[i];
    check_parameter(op, i, p, nullptr, initials[i], duals[i], steps[i], nullptr, device_type);
    check_per_group(op, "scales", i, scales[i], state_dtype(p.scalar_type()),
                    checked_view(op, views, i, p), p);
  }
  check_device_scalars(op, {&found_inf}, params, device_type);
}

// The checked tensors of nonfinite_, each dense: a dense tensor's memory is its numel entries
// in some order, so a kernel reads it flat; any other is read through a contiguous copy.
inline std::vector<at::Tensor> nonfinite_inputs(at::TensorList tensors,
                                                const at::Tensor& found_inf) {
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1,
              "nonfinite_: found_inf must be a one-element float32 tensor");
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == found_inf.device() && t.is_floating_point(),
                "nonfinite_: tensor ", i, " must be a floating-point tensor on ",
                found_inf.device());
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  return dense;
}

}  // namespace rmda_fused
