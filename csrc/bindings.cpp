// The rmda_fused operator library: the schema of the fused RMDA step and the Python module
// object `rmda_fused._C` that loading it needs. The CPU and CUDA kernels register themselves
// for these schemas in rmda_cpu.cpp, rmda_cuda.cu, nonfinite_cpu.cpp and nonfinite_cuda.cu.
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
  // Sets found_inf (a float32 scalar) to 1 when an entry of any tensor is a NaN or an
  // infinity; never to 0, so a caller zeroes it first (nonfinite_cpu.cpp, nonfinite_cuda.cu).
  m.def("nonfinite_(Tensor[] tensors, Tensor(a!) found_inf) -> ()");
}
