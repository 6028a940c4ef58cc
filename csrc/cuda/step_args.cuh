// What the CUDA kernels of rmda_step_ (rmda_cuda.cu) and of the coupled-group phases
// (coupled_cuda.cu) share: the scalars read on the device, the t/A update, the tensor table
// lookup, a deterministic block sum and the index of a group's entries.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/band_step.cuh"
#include "rmda_common.h"

namespace rmda_fused {
namespace {

// Kernel parameters may be 32 KiB since CUDA 12.1 (4 KiB before).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 128;
#else
constexpr int kMaxTensors = 36;
#endif

// Elements per block of the kernels that walk a tensor's memory in flat chunks.
constexpr int64_t kChunk = kThreads * 16;
// The 48 KiB band buffer allows 4 blocks per SM (Hopper: 228 KiB); holding registers to what
// 4 blocks can have (64 per thread) keeps them from lowering that to 3.
constexpr int kBlocksPerSM = 4;

enum ScalarKind : int { kNone = 0, kF32 = 1, kF64 = 2 };

struct StepArgs {
  const void* lr_ptr;
  const void* grad_scale;
  const void* found_inf;
  double lr;
  double momentum;
  double lam;
  int lr_kind, grad_scale_kind, found_inf_kind;
};

__device__ __forceinline__ double read_scalar(const void* p, int kind) {
  return kind == kF64 ? *static_cast<const double*>(p) : double(*static_cast<const float*>(p));
}

__device__ __forceinline__ bool skip_step(const StepArgs& a) {
  return a.found_inf_kind != kNone && read_scalar(a.found_inf, a.found_inf_kind) != 0.0;
}

template <typename acc_t>
__device__ __forceinline__ acc_t step_lr(const StepArgs& a) {
  return a.lr_kind != kNone ? acc_t(read_scalar(a.lr_ptr, a.lr_kind)) : acc_t(a.lr);
}

// s = lr * beta, divided by grad_scale if given: V <- V + s * g.
template <typename acc_t>
__device__ __forceinline__ acc_t step_grad_weight(const StepArgs& a, acc_t beta) {
  const acc_t s = beta * step_lr<acc_t>(a);
  return a.grad_scale_kind != kNone ? s / acc_t(read_scalar(a.grad_scale, a.grad_scale_kind))
                                    : s;
}

// t <- t + 1, A <- A + lr*sqrt(t): one thread per tensor of a table (anything with step[],
// alpha[] and n), before the element launch reads them.
template <typename acc_t, typename Table>
__global__ void advance_scalars_kernel(Table table, StepArgs args) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= table.n || skip_step(args)) return;
  acc_t* t = static_cast<acc_t*>(table.step[i]);
  acc_t* a = static_cast<acc_t*>(table.alpha[i]);
  const acc_t nt = *t + acc_t(1);
  *t = nt;
  *a = *a + ::sqrt(nt) * step_lr<acc_t>(args);
}

// The last tensor of a table whose first block is <= block: the tensor block works on.
__device__ __forceinline__ int tensor_of_block(const int64_t* first_block, int n,
                                               int64_t block) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Sum over the block, returned to every thread, in a fixed order (the same bits every run).
// Called once per block.
template <typename T>
__device__ T block_sum(T x) {
  __shared__ T partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < kThreads / 32 ? partial[lane] : T(0);
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Entry e of group grp of an (outer, groups, inner) view lives at
// (e / inner) * row + grp * inner + e % inner, row = groups * inner.
__device__ __forceinline__ int64_t group_entry(int64_t grp, int64_t e, int64_t outer,
                                               int64_t inner, int64_t row) {
  if (outer == 1) return grp * inner + e;
  if (inner == 1) return e * row + grp;
  const int64_t o = e / inner;
  return o * row + grp * inner + (e - o * inner);
}

// Host side: how a kernel reads an optional device scalar.
inline int scalar_kind(const std::optional<at::Tensor>& t, const char* op, const char* name) {
  if (!t) return kNone;
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op,
              " (CUDA): ", name, " must be float32 or float64, got ", t->scalar_type());
  return t->scalar_type() == at::kDouble ? kF64 : kF32;
}

// Groups per kBands block: as many as leave room in the buffer for their z, z_weight and
// partial norms (band_step); 0 when not even one fits (then the tensor goes to kGroups).
inline int64_t band_groups(const GroupView& v, at::ScalarType dtype) {
  const int64_t capacity = kBandBytes / static_cast<int64_t>(c10::elementSize(state_dtype(dtype)));
  return std::min(v.groups, (capacity - kThreads / 32) / (v.group_size() + 2));
}

}  // namespace
}  // namespace rmda_fused
