// The per-step half of a param group's step plan (rmda_fused/_step_plan.py), in C++ so that
// replaying a plan costs no Python per tensor.
//
// GradWatch holds a param group's parameters and the gradient layouts its plan was built
// for. refresh() reads every parameter's .grad (the same autograd slot Python's p.grad
// reads) and tells whether each is still absent, or present with the recorded dtype, device,
// sizes and strides: that is what replaying a plan needs, since everything else it holds is
// the optimizer's own state. PlannedStep holds one routed batch's tensors (the plan's
// positions into the watch) and calls rmda_fused::rmda_step_ on them through the
// dispatcher, which picks the CPU or CUDA kernel; GradWatch::nonfinite_ does the same for
// the gradient check. The kernels check their arguments as when called from Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace rmda_fused {
namespace {

struct GradLayout {
  bool present = false;
  bool strided = false;  // a sparse (or other non-strided) gradient is never replayed
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  // inline for up to 5 dims: the layouts lie in one array that refresh() walks in order
  c10::SmallVector<int64_t, 5> sizes, strides;

  static GradLayout of(const at::Tensor& grad) {
    GradLayout layout;
    layout.present = grad.defined();
    layout.strided = layout.present && grad.layout() == at::kStrided;
    if (!layout.strided) return layout;
    layout.dtype = grad.scalar_type();
    layout.device = grad.device();
    layout.sizes.assign(grad.sizes().begin(), grad.sizes().end());
    layout.strides.assign(grad.strides().begin(), grad.strides().end());
    return layout;
  }

  bool matches(const c10::TensorImpl* grad) const {
    if (grad == nullptr || grad == c10::UndefinedTensorImpl::singleton()) return !present;
    return strided && grad->layout() == at::kStrided && c10::typeMetaToScalarType(grad->dtype()) == dtype &&
           grad->device() == device && grad->sizes().equals(sizes) &&
           grad->strides().equals(strides);
  }
};

class GradWatch : public torch::CustomClassHolder {
 public:
  // the gradients the parameters hold now are the layouts refresh() will accept
  explicit GradWatch(std::vector<at::Tensor> params) : params_(std::move(params)) {
    layouts_.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) layouts_.push_back(GradLayout::of(grad(i)));
    found_.resize(params_.size());
  }

  // Whether every parameter's gradient has the recorded presence and layout. The kernels
  // read the gradients the parameters hold when they run, within the same optimizer step.
  bool refresh() const {
    const size_t n = params_.size();
    // two sweeps: the loads of each are independent across parameters, so their cache
    // misses overlap (one sweep chains four dependent misses per parameter)
    for (size_t i = 0; i < n; ++i) found_[i] = grad(i).unsafeGetTensorImpl();
    for (size_t i = 0; i < n; ++i) {
      if (!layouts_[i].matches(found_[i])) return false;
    }
    return true;
  }

  // The autograd slot itself: at::Tensor::grad() would also ask whether the parameter is a
  // leaf, twice the cost, for a warning that parameters never need.
  const at::Tensor& grad(size_t i) const { return params_[i].unsafeGetTensorImpl()->grad(); }

  // for the routes that take Python lists (reference, Triton, coupled phases)
  std::vector<std::optional<at::Tensor>> grads() const {
    std::vector<std::optional<at::Tensor>> out;
    out.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = grad(i);
      out.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
    }
    return out;
  }

  // rmda_fused::nonfinite_ over the present gradients on found_inf's device
  void nonfinite_(at::Tensor found_inf) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rmda_fused::nonfinite_", "")
                         .typed<void(at::TensorList, const at::Tensor&)>();
    std::vector<at::Tensor> present;
    present.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = grad(i);
      if (g.defined() && g.device() == found_inf.device()) present.push_back(g);
    }
    op.call(present, found_inf);
  }

 private:
  std::vector<at::Tensor> params_;
  std::vector<GradLayout> layouts_;
  mutable std::vector<const c10::TensorImpl*> found_;  // refresh()'s scratch
};

class PlannedStep : public torch::CustomClassHolder {
 public:
  PlannedStep(c10::intrusive_ptr<GradWatch> watch, std::vector<int64_t> positions,
              std::vector<at::Tensor> params, std::vector<at::Tensor> initials,
              std::vector<at::Tensor> duals, std::vector<at::Tensor> steps,
              std::vector<at::Tensor> alphas, std::vector<at::Tensor> zero_groups,
              std::vector<int64_t> views)
      : watch_(std::move(watch)), positions_(std::move(positions)),
        params_(std::move(params)), initials_(std::move(initials)),
        duals_(std::move(duals)), steps_(std::move(steps)), alphas_(std::move(alphas)),
        zero_groups_(std::move(zero_groups)), views_(std::move(views)) {
    TORCH_CHECK(positions_.size() == params_.size(),
                "PlannedStep: one gradient position per parameter");
  }

  void step(double lr, double momentum, double lam, const std::optional<at::Tensor>& lr_tensor,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("rmda_fused::rmda_step_", "")
            .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                        double, double, double, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
    // held for the call only: zero_grad(set_to_none=True) must be able to free them
    std::vector<at::Tensor> grads;
    grads.reserve(positions_.size());
    for (int64_t position : positions_) grads.push_back(watch_->grad(position));
    op.call(params_, grads, initials_, duals_, steps_, alphas_, zero_groups_, views_, lr,
            momentum, lam, lr_tensor, grad_scale, found_inf);
  }

 private:
  c10::intrusive_ptr<GradWatch> watch_;
  std::vector<int64_t> positions_;
  std::vector<at::Tensor> params_, initials_, duals_, steps_, alphas_, zero_groups_;
  std::vector<int64_t> views_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(rmda_fused, m) {
  m.class_<GradWatch>("GradWatch")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("refresh", &GradWatch::refresh)
      .def("grads", &GradWatch::grads)
      .def("nonfinite_", &GradWatch::nonfinite_);
  m.class_<PlannedStep>("PlannedStep")
      .def(torch::init<c10::intrusive_ptr<GradWatch>, std::vector<int64_t>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>>())
      .def("step", &PlannedStep::step);
}

}  // namespace rmda_fused
