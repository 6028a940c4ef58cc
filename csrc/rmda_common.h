// Shared by the CPU and CUDA kernels of rmda_fused::rmda_step_ (see csrc/bindings.cpp for the
// schema and SPEC.md for the update). Only argument checks and the group-view decoding live
// here, so the two devices cannot disagree about what a valid call is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <optional>

namespace rmda_fused {

// Per-tensor (outer, groups, inner) view of a contiguous tensor; group g is view[:, g, :].
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

// The state dtype of SPEC.md "Numerics": fp64 for fp64 params, fp32 for everything else.
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
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && initials.size() == n && duals.size() == n &&
                  steps.size() == n && alphas.size() == n,
              "rmda_step_: every tensor list needs one entry per parameter");
  const bool prox = !views.empty();
  TORCH_CHECK(!prox || (views.size() == 3 * n && zero_groups.size() == n),
              "rmda_step_: views must hold 3 ints and zero_groups one mask per parameter "
              "(or both be empty for grouping 'none')");
  TORCH_CHECK(prox || zero_groups.empty(), "rmda_step_: zero_groups given without views");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type, "rmda_step_: parameter ", i, " is on ",
                p.device(), ", this kernel runs on ", device_type);
    const auto acc = state_dtype(p.scalar_type());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "rmda_step_: parameter ", i,
                " is not floating point");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() &&
                    initials[i].scalar_type() == p.scalar_type(),
                "rmda_step_: grad and initial of parameter ", i, " must have its dtype ",
                p.scalar_type());
    TORCH_CHECK(duals[i].scalar_type() == acc && steps[i].scalar_type() == acc &&
                    alphas[i].scalar_type() == acc,
                "rmda_step_: dual, step and alpha of parameter ", i, " must be ", acc);
    for (const at::Tensor* t : {&p, &grads[i], &initials[i], &duals[i]}) {
      TORCH_CHECK(t->device() == p.device(), "rmda_step_: tensors of parameter ", i,
                  " are on different devices");
      TORCH_CHECK(t->is_contiguous(), "rmda_step_: tensors of parameter ", i,
                  " must be contiguous (the group view is defined on the contiguous layout)");
      TORCH_CHECK(t->numel() == p.numel(), "rmda_step_: tensors of parameter ", i,
                  " differ in size");
    }
    TORCH_CHECK(steps[i].numel() == 1 && alphas[i].numel() == 1 &&
                    steps[i].device() == p.device() && alphas[i].device() == p.device(),
                "rmda_step_: step and alpha of parameter ", i,
                " must be one-element tensors on its device");
    if (prox) {
      const GroupView v = view_of(views, i);
      TORCH_CHECK(v.outer >= 0 && v.groups >= 0 && v.inner >= 0 &&
                      v.outer * v.groups * v.inner == p.numel(),
                  "rmda_step_: view (", v.outer, ", ", v.groups, ", ", v.inner,
                  ") does not cover parameter ", i, " of ", p.numel(), " elements");
      const at::Tensor& mask = zero_groups[i];
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                      mask.numel() == v.groups && mask.device() == p.device(),
                  "rmda_step_: zero_groups of parameter ", i, " must be a contiguous bool "
                  "tensor of ", v.groups, " entries on its device");
    }
  }
  for (const auto* opt : {&lr_tensor, &grad_scale, &found_inf}) {
    if (opt->has_value()) {
      TORCH_CHECK((*opt)->numel() == 1, "rmda_step_: lr_tensor, grad_scale and found_inf "
                  "must have one element");
      TORCH_CHECK(n == 0 || device_type == at::kCPU || (*opt)->device() == params[0].device(),
                  "rmda_step_: lr_tensor, grad_scale and found_inf must be on the "
                  "parameters' device");
    }
  }
}

}  // namespace rmda_fused
