// The rmda_fused operator library: the schemas of the fused RMDA step, of the two kernel phases
// of a coupled-group step and of the gradient check, and the Python module object
// `rmda_fused._C` that loading it needs. The CPU and CUDA kernels register themselves for
// these schemas in rmda_cpu.cpp, rmda_cuda.cu, coupled_cpu.cpp, coupled_cuda.cu,
// nonfinite_cpu.cpp and nonfinite_cuda.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import rmda_fused._C` only has to load this library so that the TORCH_LIBRARY blocks run;
// the ops are then reached through torch.ops.rmda_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rmda_fused, m) {
  // One RMDA step (docs/algorithm.md, "The update") over aligned lists of tensors that share lr, momentum and lam.
  // views: (outer, groups, inner) per tensor, flattened; empty for grouping 'none', and then
  // zero_groups is empty too. lr_tensor, if given, overrides lr (a device scalar lets a CUDA
  // step run without host syncs and under graph capture). grad_scale divides the gradients;
  // a nonzero found_inf makes the step change nothing, not even steps.
  m.def(
      "rmda_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] initials, "
      "Tensor(b!)[] duals, Tensor(c!)[] steps, Tensor(d!)[] alphas, "
      "Tensor(e!)[] zero_groups, int[] views, float lr, float momentum, float lam, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The kernel phases of a coupled-group step (docs/algorithm.md, "Coupled channel groups"),
  // over each tensor's input_channel memory view (views: (outer, groups, inner) per tensor).
  // rmda_partials_: t <- t+1, A <- A + lr*sqrt(t), V <- V + lr*sqrt(t)/grad_scale * g, and
  // partials[i][k] = sum of z^2 over group k of tensor i (z = W0 - V/sqrt(t)), in the state
  // dtype. The reduce of the partials into per-group scales is torch code between the two.
  // rmda_apply_: W <- (1 - momentum) W + momentum * scales[i][k] * z for the entries of group
  // k; it reads t as rmda_partials_ left it and changes only W. A nonzero found_inf makes
  // either change nothing (partials are then not written).
  m.def(
      "rmda_partials_(Tensor[] params, Tensor[] grads, Tensor[] initials, "
      "Tensor(a!)[] duals, Tensor(b!)[] steps, Tensor(c!)[] alphas, Tensor(d!)[] partials, "
      "int[] views, float lr, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "rmda_apply_(Tensor(a!)[] params, Tensor[] initials, Tensor[] duals, Tensor[] steps, "
      "Tensor[] scales, int[] views, float momentum, Tensor? found_inf=None) -> ()");
  // Sets found_inf (a float32 scalar) to 1 when an entry of any tensor is a NaN or an
  // infinity; never to 0, so a caller zeroes it first (nonfinite_cpu.cpp, nonfinite_cuda.cu).
  m.def("nonfinite_(Tensor[] tensors, Tensor(a!) found_inf) -> ()");
}
