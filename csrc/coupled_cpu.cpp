// CPU kernels of the two kernel phases of a coupled-group step (bindings.cpp; the step:
// docs/algorithm.md, "Coupled channel groups"): rmda_fused::rmda_partials_ advances t, A and V
// and sums z^2 per group of each tensor's input_channel memory view; rmda_fused::rmda_apply_
// writes W from z and the per-group scales the reduce in between computed. Both walk each
// tensor as column bands of its (outer, groups*inner) rows, cut and run by the work plan of
// the fused step (cpu/work_plan.cpp): one streaming pass per phase, all tensors in one
// parallel region, split bands summed in chunk order (the same bits on any thread count).
// cpu/rmda_kernel.h comes first: it sets the ISA of ATen's vec headers (see cpu/vec_io.h).
#include "cpu/rmda_kernel.h"
#include "cpu/step_job.h"
#include "cpu/work_plan.h"

#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "rmda_common.h"

namespace rmda_fused {
namespace {

// One phase over every tensor, as column bands of its view in one parallel region.
// `scalars_of(i, view)` gives tensor i's step scalars; `grads` is empty in the apply phase
// (it reads no gradient); `buffers[i]` are tensor i's partials or scales.
template <typename ScalarsOf>
void run_phase(at::TensorList params, at::TensorList grads, at::TensorList initials,
               at::TensorList duals, at::TensorList buffers, at::IntArrayRef views,
               const ScalarsOf& scalars_of, cpu::Phase phase) {
  std::vector<cpu::TensorJob> jobs;
  std::vector<cpu::WorkItem> items;
  std::vector<cpu::SplitBand> bands;
  jobs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const GroupView view = view_of(views, i);
    jobs.push_back(cpu::TensorJob{params[i].data_ptr(), duals[i].data_ptr(),
                                  grads.empty() ? nullptr : grads[i].data_ptr(),
                                  initials[i].data_ptr(), nullptr, view, scalars_of(i, view),
                                  params[i].scalar_type(), buffers[i].data_ptr()});
    cpu::append_column_bands(items, bands, static_cast<int32_t>(i), view);
  }
  cpu::run_items(jobs, items, bands, phase);
}

void rmda_partials_cpu(at::TensorList params, at::TensorList grads, at::TensorList initials,
                       at::TensorList duals, at::TensorList steps, at::TensorList alphas,
                       at::TensorList partials, at::IntArrayRef views, double lr,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  check_partials_args(params, grads, initials, duals, steps, alphas, partials, views, lr_tensor,
                      grad_scale, found_inf, at::kCPU);
  const cpu::HostScalars host = cpu::read_host_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (host.skip) return;  // nothing moves; the partials are not read afterwards
  // momentum and lam play no part here (threshold: the reduce's; W: rmda_apply_'s)
  const auto scalars_of = [&](size_t i, const GroupView& view) {
    return params[i].scalar_type() == at::kDouble
        ? cpu::advance_scalars<double>(steps[i], alphas[i], host.lr, host.grad_scale, 0.0, 0.0,
                                       view.group_size())
        : cpu::advance_scalars<float>(steps[i], alphas[i], host.lr, host.grad_scale, 0.0, 0.0,
                                      view.group_size());
  };
  run_phase(params, grads, initials, duals, partials, views, scalars_of, cpu::Phase::kPartials);
}

void rmda_apply_cpu(at::TensorList params, at::TensorList initials, at::TensorList duals,
                    at::TensorList steps, at::TensorList scales, at::IntArrayRef views,
                    double momentum, const std::optional<at::Tensor>& found_inf) {
  check_apply_args(params, initials, duals, steps, scales, views, found_inf, at::kCPU);
  if (cpu::read_host_scalars(0.0, std::nullopt, std::nullopt, found_inf).skip) return;
  const auto scalars_of = [&](size_t i, const GroupView&) {
    return params[i].scalar_type() == at::kDouble ? cpu::apply_scalars<double>(steps[i], momentum)
                                                  : cpu::apply_scalars<float>(steps[i], momentum);
  };
  run_phase(params, {}, initials, duals, scales, views, scalars_of, cpu::Phase::kApply);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CPU, m) {
  m.impl("rmda_partials_", &rmda_partials_cpu);
  m.impl("rmda_apply_", &rmda_apply_cpu);
}

}  // namespace rmda_fused
