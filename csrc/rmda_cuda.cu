// CUDA kernel of rmda_fused::rmda_step_ (docs/algorithm.md, "The update"): one fused,
// multi-tensor RMDA step.
//
// Tensors are bucketed by (dtype, mode); each bucket is cut into tables of up to kMaxTensors
// tensors that travel as a kernel parameter (no device buffer to upload, nothing to keep
// alive for CUDA-graph replays). Per table: one tiny launch advances every tensor's t and A,
// then one launch does the elements. So a step costs 2 launches per ~kMaxTensors tensors of
// a dtype, whatever their sizes. lr (optionally), grad_scale and found_inf are read on the
// device: no host synchronisation, graph capturable (with lr as a device tensor, lr changes
// between replays are seen).
//
// Modes: kPlain (grouping 'none') and kSingle (groups of one entry: L1) split tensors into
// chunks of kChunk elements, one block each. kBands serves every other grouped tensor whose
// group fits in a block's shared buffer. A strided group alone is one short run per row (one
// element for input channels of a 1x1 conv: a warp load would use 1/8 of each 32-byte
// sector), but a band of consecutive groups is `outer` contiguous runs, so a block takes as
// many whole groups as its buffer holds and walks them along the runs. Pass 1 updates V and
// keeps z in the buffer, the group norms are summed from there, and pass 2 writes W from
// there: g, V, W0 and W are read once, V and W written once (24 B/element in fp32). kGroups,
// one block per group, is left for groups larger than the buffer: pass 1 updates V and
// block-reduces sum(z^2) in the state dtype; pass 2 re-reads V and W0 (the group was just
// touched, so mostly L2 hits) and writes W. Each thread re-reads in pass 2 exactly the
// entries it wrote in pass 1, so no fence is needed between the passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <map>
#include <utility>
#include <vector>

#include "cuda/band_step.cuh"
#include "cuda/step_args.cuh"
#include "rmda_common.h"

namespace rmda_fused {
namespace {

enum Mode : int { kPlain = 0, kSingle = 1, kGroups = 2, kBands = 3 };

struct TensorTable {
  void* w[kMaxTensors];
  const void* g[kMaxTensors];
  const void* w0[kMaxTensors];
  void* v[kMaxTensors];
  bool* mask[kMaxTensors];
  void* step[kMaxTensors];
  void* alpha[kMaxTensors];
  int64_t outer[kMaxTensors];
  int64_t groups[kMaxTensors];
  int64_t inner[kMaxTensors];
  int64_t band[kMaxTensors];  // kBands: groups per block (the last block may get fewer)
  // block b of the element launch works on tensor i with first_block[i] <= b < first_block[i+1]
  int64_t first_block[kMaxTensors + 1];
  int n;
};

template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) rmda_elements_kernel(TensorTable table, StepArgs args) {
  using acc_t = at::opmath_type<scalar_t>;
  if (skip_step(args)) return;
  const int i = tensor_of_block(table.first_block, table.n, blockIdx.x);
  const int64_t local = blockIdx.x - table.first_block[i];
  const int64_t outer = table.outer[i], groups = table.groups[i], inner = table.inner[i];

  const acc_t t = *static_cast<const acc_t*>(table.step[i]);  // already advanced
  const acc_t beta = ::sqrt(t);
  const acc_t grad_weight = step_grad_weight<acc_t>(args, beta);
  const acc_t tau = (*static_cast<const acc_t*>(table.alpha[i]) / beta) * acc_t(args.lam);
  const acc_t thr = tau * acc_t(::sqrt(double(outer * inner)));
  const ElementStep<scalar_t, acc_t> op{
      static_cast<scalar_t*>(table.w[i]), static_cast<const scalar_t*>(table.g[i]),
      static_cast<const scalar_t*>(table.w0[i]), static_cast<acc_t*>(table.v[i]),
      beta, grad_weight, thr, acc_t(args.momentum), acc_t(1.0 - args.momentum)};

  if constexpr (kMode == kPlain || kMode == kSingle) {
    const int64_t numel = outer * groups * inner;
    const int64_t end = numel < (local + 1) * kChunk ? numel : (local + 1) * kChunk;
    bool* mask = table.mask[i];
    unrolled(local * kChunk + threadIdx.x, end, kThreads,
             [&](int64_t e) { return op.load_with_weight(e); },
             [&](int64_t e, const auto& x) {
               const acc_t z = op.dual_and_z(e, x);
               acc_t z_weight = op.c;
               if constexpr (kMode == kSingle) {
                 const acc_t n = z < acc_t(0) ? -z : z;
                 const bool keep = n > thr;
                 mask[e] = n <= thr;  // a NaN is never recorded as zero
                 z_weight = keep ? op.c * ((n - thr) / n) : acc_t(0);
               }
               op.write_weight(e, x.w, z, z_weight);
             });
  } else if constexpr (kMode == kBands) {
    band_step(op, table.mask[i], outer, groups, inner, table.band[i], local);
  } else {
    const int64_t grp = local, size = outer * inner, row = groups * inner;
    auto index = [&](int64_t e) { return group_entry(grp, e, outer, inner, row); };
    acc_t sum_sq = 0;
    for (int64_t e = threadIdx.x; e < size; e += kThreads) {
      const acc_t z = op.dual_and_z(index(e));
      sum_sq += z * z;
    }
    const acc_t n = ::sqrt(block_sum(sum_sq));
    const bool keep = n > thr;
    if (threadIdx.x == 0) table.mask[i][grp] = n <= thr;  // NaN: not zero
    const acc_t z_weight = keep ? op.c * ((n - thr) / n) : acc_t(0);
    for (int64_t e = threadIdx.x; e < size; e += kThreads) op.rewrite_weight(index(e), z_weight);
  }
}

template <typename scalar_t>
void launch_table(const TensorTable& table, const StepArgs& args, int mode, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  advance_scalars_kernel<acc_t><<<1, kMaxTensors, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = table.first_block[table.n];
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= INT_MAX, "rmda_step_ (CUDA): too many blocks in one launch");
  switch (mode) {
    case kPlain: rmda_elements_kernel<scalar_t, kPlain><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, args); break;
    case kSingle: rmda_elements_kernel<scalar_t, kSingle><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, args); break;
    case kBands: rmda_elements_kernel<scalar_t, kBands><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, args); break;
    default: rmda_elements_kernel<scalar_t, kGroups><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, args); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rmda_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList initials,
                    at::TensorList duals, at::TensorList steps, at::TensorList alphas,
                    at::TensorList zero_groups, at::IntArrayRef views, double lr,
                    double momentum, double lam, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  check_step_args(params, grads, initials, duals, steps, alphas, zero_groups, views, lr_tensor,
                  grad_scale, found_inf, at::kCUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.device() == device, "rmda_step_ (CUDA): all parameters must be on one device");
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool prox = !views.empty();
  StepArgs args{lr_tensor ? lr_tensor->data_ptr() : nullptr,
                grad_scale ? grad_scale->data_ptr() : nullptr,
                found_inf ? found_inf->data_ptr() : nullptr,
                lr, momentum, lam,
                scalar_kind(lr_tensor, "rmda_step_", "lr_tensor"),
                scalar_kind(grad_scale, "rmda_step_", "grad_scale"),
                scalar_kind(found_inf, "rmda_step_", "found_inf")};

  std::map<std::pair<at::ScalarType, int>, std::vector<size_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) {
    // kBands reads each element once, coalesced; kGroups only when one group overflows a band
    const int mode = !prox                                            ? kPlain
        : view_of(views, i).group_size() == 1                         ? kSingle
        : band_groups(view_of(views, i), params[i].scalar_type()) > 0 ? kBands
                                                                      : kGroups;
    buckets[{params[i].scalar_type(), mode}].push_back(i);
  }
  for (const auto& [key, members] : buckets) {
    const auto [dtype, mode] = key;
    for (size_t start = 0; start < members.size(); start += kMaxTensors) {
      TensorTable table{};
      table.n = static_cast<int>(std::min<size_t>(kMaxTensors, members.size() - start));
      int64_t blocks = 0;
      for (int k = 0; k < table.n; ++k) {
        const size_t i = members[start + k];
        const GroupView v = prox ? view_of(views, i) : GroupView{1, params[i].numel(), 1};
        table.w[k] = params[i].data_ptr();
        table.g[k] = grads[i].data_ptr();
        table.w0[k] = initials[i].data_ptr();
        table.v[k] = duals[i].data_ptr();
        table.mask[k] = prox ? zero_groups[i].data_ptr<bool>() : nullptr;
        table.step[k] = steps[i].data_ptr();
        table.alpha[k] = alphas[i].data_ptr();
        table.outer[k] = v.outer;
        table.groups[k] = v.groups;
        table.inner[k] = v.inner;
        table.band[k] = mode == kBands ? band_groups(v, dtype) : 0;
        table.first_block[k] = blocks;
        blocks += mode == kBands    ? (v.groups + table.band[k] - 1) / table.band[k]
                  : mode == kGroups ? v.groups
                                    : (params[i].numel() + kChunk - 1) / kChunk;
      }
      table.first_block[table.n] = blocks;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rmda_step_cuda", [&] {
        launch_table<scalar_t>(table, args, mode, stream);
      });
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CUDA, m) {
  m.impl("rmda_step_", &rmda_step_cuda);
}

}  // namespace rmda_fused
