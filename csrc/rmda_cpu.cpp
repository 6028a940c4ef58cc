// CPU kernel of rmda_fused::rmda_step_ (docs/algorithm.md, "The update"): one fused,
// multi-tensor RMDA step. This file checks the arguments, advances each tensor's scalars and
// describes each tensor as a TensorJob; cpu/work_plan.cpp cuts the jobs into work units and
// runs them, cpu/rmda_kernel.h does the arithmetic.
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

void rmda_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList initials,
                   at::TensorList duals, at::TensorList steps, at::TensorList alphas,
                   at::TensorList zero_groups, at::IntArrayRef views, double lr,
                   double momentum, double lam, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  check_step_args(params, grads, initials, duals, steps, alphas, zero_groups, views, lr_tensor,
                  grad_scale, found_inf, at::kCPU);
  // found_inf stops the step before t moves
  const cpu::HostScalars host = cpu::read_host_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (host.skip) return;
  const bool prox = !views.empty();

  std::vector<cpu::TensorJob> jobs;
  std::vector<cpu::WorkItem> items;
  std::vector<cpu::SplitBand> bands;
  jobs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const int64_t numel = param.numel();
    const GroupView view = prox ? view_of(views, i) : GroupView{1, numel, 1};
    const int64_t group_size = prox ? view.group_size() : 1;
    const cpu::StepScalars scalars = param.scalar_type() == at::kDouble
        ? cpu::advance_scalars<double>(steps[i], alphas[i], host.lr, host.grad_scale, momentum,
                                       lam, group_size)
        : cpu::advance_scalars<float>(steps[i], alphas[i], host.lr, host.grad_scale, momentum,
                                      lam, group_size);
    jobs.push_back(cpu::TensorJob{param.data_ptr(), duals[i].data_ptr(), grads[i].data_ptr(),
                                  initials[i].data_ptr(),
                                  prox ? zero_groups[i].data_ptr<bool>() : nullptr, view,
                                  scalars, param.scalar_type()});
    cpu::append_items(items, bands, static_cast<int32_t>(i), jobs.back(), prox, numel);
  }
  cpu::run_items(jobs, items, bands, prox ? cpu::Phase::kProxStep : cpu::Phase::kPlainStep);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CPU, m) {
  m.impl("rmda_step_", &rmda_step_cpu);
}

}  // namespace rmda_fused
