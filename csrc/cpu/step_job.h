// What one CPU step is made of: a TensorJob per parameter tensor (built by rmda_cpu.cpp, or
// coupled_cpu.cpp for the two kernel phases of a coupled-group step), cut into work units by
// the work plan (work_plan.h) and run by the kernel (rmda_kernel.h).
// Plain data with type-erased pointers, so that one plan can mix every parameter dtype.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "rmda_common.h"

namespace rmda_fused::cpu {

// What a run of the work plan computes: the fused step (grouping 'none', or with the prox),
// or one kernel phase of a coupled-group step (bindings.cpp): each group's sum of z^2
// (rmda_partials_), or W from z and a given scale per group (rmda_apply_).
enum class Phase { kPlainStep, kProxStep, kPartials, kApply };

// The scalars of one tensor's step, computed in the state dtype as the reference backend
// does and stored as double (exact for fp32 and fp64).
struct StepScalars {
  double inv_beta;     // 1 / beta, beta = sqrt(t)
  double grad_weight;  // s = lr * beta, divided by grad_scale if given: V <- V + s * g
  double threshold;    // tau * sqrt(group size): a group whose norm of z is not above it becomes 0
  double momentum;     // c of W <- (1 - c) W + c * prox(z)
  double one_minus_momentum;
};

// One parameter tensor of the step. weight (W) is the parameter, dual (V) and zero_mask are
// optimizer state; grad (g) and initial (W0) are only read. dual is in the state dtype
// (fp64 for fp64 parameters, fp32 otherwise), the others in `dtype`.
struct TensorJob {
  void* weight;
  void* dual;
  const void* grad;
  const void* initial;
  bool* zero_mask;  // one entry per group; nullptr for grouping 'none' and the coupled phases
  GroupView view;
  StepScalars scalars;
  at::ScalarType dtype;
  // coupled phases: one state-dtype entry per group, the partials written or the scales read
  void* group_values = nullptr;
};

// A unit of work for one thread: elements [begin, end) of a tensor for the single-pass
// cases, groups [begin, end) when groups need a norm.
struct WorkItem {
  int32_t job;  // index into the step's TensorJobs
  int64_t begin, end;
  int64_t cost;  // elements touched, weighted by bytes moved: balances the threads
};

// A band of whole strided groups [first_group, last_group) too big for one thread, split
// into `chunks` chunks of `rows_per_chunk` rows. Chunk k's column sums of z^2 lie at
// column_sums + k * width (in the state dtype, width = band columns) and are reduced into
// chunk 0's, which then holds each column's z weight.
struct SplitBand {
  int32_t job;
  int64_t first_group, last_group, rows_per_chunk, chunks;
  void* column_sums;
};

}  // namespace rmda_fused::cpu
