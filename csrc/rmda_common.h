// Shared by the CPU and CUDA kernels of rmda_fused::rmda_step_ and rmda_fused::nonfinite_ (see
// csrc/bindings.cpp for the schemas and docs/algorithm.md, "The update", for the update). Only
// argument checks and the group-view decoding live here, so the two devices cannot disagree
// about what a valid call is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
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
  const size_t num_params = params.size();
  TORCH_CHECK(grads.size() == num_params && initials.size() == num_params &&
                  duals.size() == num_params && steps.size() == num_params &&
                  alphas.size() == num_params,
              "rmda_step_: every tensor list needs one entry per parameter");
  const bool prox = !views.empty();
  TORCH_CHECK(!prox || (views.size() == 3 * num_params && zero_groups.size() == num_params),
              "rmda_step_: views must hold 3 ints and zero_groups one mask per parameter "
              "(or both be empty for grouping 'none')");
  TORCH_CHECK(prox || zero_groups.empty(), "rmda_step_: zero_groups given without views");
  for (size_t i = 0; i < num_params; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type, "rmda_step_: parameter ", i, " is on ",
                p.device(), ", this kernel runs on ", device_type);
    const auto state_type = state_dtype(p.scalar_type());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "rmda_step_: parameter ", i,
                " is not floating point");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() &&
                    initials[i].scalar_type() == p.scalar_type(),
                "rmda_step_: grad and initial of parameter ", i, " must have its dtype ",
                p.scalar_type());
    TORCH_CHECK(duals[i].scalar_type() == state_type && steps[i].scalar_type() == state_type &&
                    alphas[i].scalar_type() == state_type,
                "rmda_step_: dual, step and alpha of parameter ", i, " must be ", state_type);
    for (const at::Tensor* t : {&p, &grads[i], &initials[i], &duals[i]}) {
      TORCH_CHECK(t->device() == p.device(), "rmda_step_: tensors of parameter ", i,
                  " are on different devices");
      // the kernels walk memory: a dense layout (contiguous or permuted, e.g. channels_last)
      // shared by all four tensors, over which the caller expressed the group view
      TORCH_CHECK(t->is_non_overlapping_and_dense() && t->strides() == p.strides(),
                  "rmda_step_: tensors of parameter ", i, " must share one dense memory "
                  "layout (the group view is defined over it)");
      TORCH_CHECK(t->numel() == p.numel(), "rmda_step_: tensors of parameter ", i,
                  " differ in size");
    }
    TORCH_CHECK(steps[i].numel() == 1 && alphas[i].numel() == 1 &&
                    steps[i].device() == p.device() && alphas[i].device() == p.device(),
                "rmda_step_: step and alpha of parameter ", i,
                " must be one-element tensors on its device");
    if (prox) {
      const GroupView view = view_of(views, i);
      TORCH_CHECK(view.outer >= 0 && view.groups >= 0 && view.inner >= 0 &&
                      view.outer * view.groups * view.inner == p.numel(),
                  "rmda_step_: view (", view.outer, ", ", view.groups, ", ", view.inner,
                  ") does not cover parameter ", i, " of ", p.numel(), " elements");
      const at::Tensor& mask = zero_groups[i];
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                      mask.numel() == view.groups && mask.device() == p.device(),
                  "rmda_step_: zero_groups of parameter ", i, " must be a contiguous bool "
                  "tensor of ", view.groups, " entries on its device");
    }
  }
  for (const auto* scalar : {&lr_tensor, &grad_scale, &found_inf}) {
    if (scalar->has_value()) {
      TORCH_CHECK((*scalar)->numel() == 1, "rmda_step_: lr_tensor, grad_scale and found_inf "
                  "must have one element");
      TORCH_CHECK(num_params == 0 || device_type == at::kCPU ||
                      (*scalar)->device() == params[0].device(),
                  "rmda_step_: lr_tensor, grad_scale and found_inf must be on the "
                  "parameters' device");
    }
  }
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
