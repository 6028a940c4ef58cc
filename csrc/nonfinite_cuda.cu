// CUDA kernel of rmda_fused::nonfinite_: found_inf <- 1 when any entry of any tensor is a NaN
// or an infinity. The optimizer's default check of gradients no GradScaler has seen: it only
// reads them (GradScaler's own check also writes every gradient back), takes every float
// dtype, and makes one launch per dtype and ~kMaxTensors tensors, with no per-tensor results
// for the host to collect.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <vector>

#include "rmda_common.h"

namespace rmda_fused {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 16;
constexpr int kMaxTensors = 128;

struct ReadTable {
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_block[kMaxTensors + 1];
  int n;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(ReadTable table, float* found_inf) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = table.n - 1;  // the last tensor whose first block is <= this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const scalar_t* x = static_cast<const scalar_t*>(table.data[lo]);
  const int64_t begin = (block - table.first_block[lo]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[lo] ? begin + kChunk : table.numel[lo];
  bool bad = false;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    bad |= !::isfinite(static_cast<at::opmath_type<scalar_t>>(x[e]));
  }
  // only ever 1 is written, so blocks need no ordering among themselves
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

void nonfinite_cuda(at::TensorList tensors, const at::Tensor& found_inf) {
  const std::vector<at::Tensor> dense = nonfinite_inputs(tensors, found_inf);
  std::map<at::ScalarType, std::vector<const at::Tensor*>> buckets;
  for (const at::Tensor& t : dense) {
    if (t.numel() > 0) buckets[t.scalar_type()].push_back(&t);
  }
  const c10::cuda::CUDAGuard guard(found_inf.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* flag = found_inf.data_ptr<float>();
  for (const auto& [dtype, members] : buckets) {
    for (size_t start = 0; start < members.size(); start += kMaxTensors) {
      ReadTable table{};
      table.n = static_cast<int>(std::min<size_t>(kMaxTensors, members.size() - start));
      int64_t blocks = 0;
      for (int k = 0; k < table.n; ++k) {
        const at::Tensor& t = *members[start + k];
        table.data[k] = t.data_ptr();
        table.numel[k] = t.numel();
        table.first_block[k] = blocks;
        blocks += (t.numel() + kChunk - 1) / kChunk;
      }
      table.first_block[table.n] = blocks;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nonfinite_cuda", [&] {
        nonfinite_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            table, flag);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CUDA, m) {
  m.impl("nonfinite_", &nonfinite_cuda);
}

}  // namespace rmda_fused
