// CUDA kernels of the two kernel phases of a coupled-group step (bindings.cpp; the step:
// docs/algorithm.md, "Coupled channel groups"): rmda_fused::rmda_partials_ and
// rmda_fused::rmda_apply_. Compiled for sm_90 in CI (csrc/build_cuda_check.sh); not yet run on
// a GPU.
//
// Launches as rmda_cuda.cu's: tensors bucketed by (dtype, mode), tables of up to kMaxTensors
// tensors passed as kernel parameters, lr (optionally), grad_scale and found_inf read on the
// device (no host synchronisation), the current stream under a device guard.
// - partials: per table, the t/A launch of the fused step, then one block per band of whole
//   groups (kBands: the band's pass 1 and group sums of z^2 of the fused step's kBands,
//   walked along the rows' contiguous runs, z kept in shared memory; each group's sum is
//   written straight to partials), or, for groups larger than the band buffer, one block per
//   group (kGroups: block_sum). Every sum is made in a fixed order: no float atomics, the
//   same bits every run. Traffic: g, W0, V read, V written (16 B/element in fp32).
// - apply: one launch per table, flat chunks of kChunk elements of memory per block
//   (coalesced whatever the view); each element's group follows from its index by carries
//   (GroupWalker), no division per element. W0, V, W read, W written (16 B/element).
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

enum CoupledMode : int { kApplyChunks = 0, kPartialBands = 1, kPartialGroups = 2 };

struct CoupledTable {
  void* w[kMaxTensors];
  const void* g[kMaxTensors];
  const void* w0[kMaxTensors];
  void* v[kMaxTensors];
  void* step[kMaxTensors];
  void* alpha[kMaxTensors];
  void* group_values[kMaxTensors];  // partials (written) or scales (read), one per group
  int64_t outer[kMaxTensors];
  int64_t groups[kMaxTensors];
  int64_t inner[kMaxTensors];
  int64_t band[kMaxTensors];  // kPartialBands: groups per block (the last block may get fewer)
  // block b of a launch works on tensor i with first_block[i] <= b < first_block[i+1]
  int64_t first_block[kMaxTensors + 1];
  int n;
};

template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    partials_kernel(CoupledTable table, StepArgs args) {
  using acc_t = at::opmath_type<scalar_t>;
  if (skip_step(args)) return;
  const int i = tensor_of_block(table.first_block, table.n, blockIdx.x);
  const int64_t local = blockIdx.x - table.first_block[i];
  const int64_t outer = table.outer[i], groups = table.groups[i], inner = table.inner[i];
  const acc_t beta = ::sqrt(*static_cast<const acc_t*>(table.step[i]));  // already advanced
  // threshold and momentum belong to the reduce and to rmda_apply_
  const ElementStep<scalar_t, acc_t> op{
      nullptr, static_cast<const scalar_t*>(table.g[i]),
      static_cast<const scalar_t*>(table.w0[i]), static_cast<acc_t*>(table.v[i]),
      beta, step_grad_weight<acc_t>(args, beta), acc_t(0), acc_t(0), acc_t(1)};
  acc_t* const partials = static_cast<acc_t*>(table.group_values[i]);
  if constexpr (kMode == kPartialBands) {
    __shared__ acc_t buf[kBandBytes / sizeof(acc_t)];
    const Band b(outer, groups, inner, table.band[i], local);
    const int slices = band_pass1(op, buf, b, outer, inner);
    for (int64_t gl = threadIdx.x; gl < b.nb; gl += kThreads) {
      partials[b.g0 + gl] = band_group_sum(buf, b, slices, gl);
    }
  } else {
    const int64_t grp = local, size = outer * inner, row = groups * inner;
    acc_t sum_sq = 0;
    for (int64_t e = threadIdx.x; e < size; e += kThreads) {
      const acc_t z = op.dual_and_z(group_entry(grp, e, outer, inner, row));
      sum_sq += z * z;
    }
    const acc_t total = block_sum(sum_sq);
    if (threadIdx.x == 0) partials[grp] = total;
  }
}

// The group of memory element e of an (outer, groups, inner) view, e = (o * groups + group)
// * inner + k, followed along e, e + stride, ... by two carries instead of a division per
// element: k and group each advance by a step smaller than their range plus at most one
// carry, so one subtraction brings each back into range.
struct GroupWalker {
  int64_t k, group, step_k, step_group, groups, inner;
  __device__ GroupWalker(int64_t first, int64_t stride, int64_t num_groups, int64_t inner_size)
      : groups(num_groups), inner(inner_size) {
    const int64_t q = first / inner;
    k = first - q * inner;
    group = q % groups;
    step_k = stride % inner;
    step_group = (stride / inner) % groups;
  }
  __device__ __forceinline__ void advance() {
    k += step_k;
    group += step_group;
    if (k >= inner) {
      k -= inner;
      ++group;
    }
    if (group >= groups) group -= groups;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) apply_kernel(CoupledTable table, StepArgs args) {
  using acc_t = at::opmath_type<scalar_t>;
  if (skip_step(args)) return;
  const int i = tensor_of_block(table.first_block, table.n, blockIdx.x);
  const int64_t local = blockIdx.x - table.first_block[i];
  const int64_t groups = table.groups[i], inner = table.inner[i];
  const int64_t numel = table.outer[i] * groups * inner;
  const acc_t c = acc_t(args.momentum);
  // t as rmda_partials_ advanced it; no gradient and no threshold in this phase
  const ElementStep<scalar_t, acc_t> op{
      static_cast<scalar_t*>(table.w[i]), nullptr, static_cast<const scalar_t*>(table.w0[i]),
      static_cast<acc_t*>(table.v[i]), ::sqrt(*static_cast<const acc_t*>(table.step[i])),
      acc_t(0), acc_t(0), c, acc_t(1.0 - args.momentum)};
  const acc_t* const scales = static_cast<const acc_t*>(table.group_values[i]);
  const int64_t first = local * kChunk + threadIdx.x;
  const int64_t end = numel < (local + 1) * kChunk ? numel : (local + 1) * kChunk;
  if (first >= end) return;  // numel > 0 from here on, so groups, inner > 0
  GroupWalker walker(first, kThreads, groups, inner);
  struct Loaded {
    acc_t w, z, z_weight;
  };
  // unrolled() calls load once per element, in order of e: the walker keeps pace with it
  unrolled(first, end, kThreads,
           [&](int64_t e) {
             const Loaded x{op.old_weight(e), op.stored_z(e), c * __ldg(scales + walker.group)};
             walker.advance();
             return x;
           },
           [&](int64_t e, const Loaded& x) { op.write_weight(e, x.w, x.z, x.z_weight); });
}

template <typename scalar_t>
void launch_table(const CoupledTable& table, const StepArgs& args, int mode,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (mode != kApplyChunks) {
    advance_scalars_kernel<acc_t><<<1, kMaxTensors, 0, stream>>>(table, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t blocks = table.first_block[table.n];
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= INT_MAX,
              "rmda_fused coupled phases (CUDA): too many blocks in one launch");
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (mode) {
    case kApplyChunks: apply_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(table, args); break;
    case kPartialBands:
      partials_kernel<scalar_t, kPartialBands><<<grid, kThreads, 0, stream>>>(table, args);
      break;
    default:
      partials_kernel<scalar_t, kPartialGroups><<<grid, kThreads, 0, stream>>>(table, args);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Both phases: buckets of (dtype, mode), cut into tables and launched on the current stream.
// grads and alphas are empty for rmda_apply_.
void launch_coupled(bool partials_phase, at::TensorList params, at::TensorList grads,
                    at::TensorList initials, at::TensorList duals, at::TensorList steps,
                    at::TensorList alphas, at::TensorList group_values, at::IntArrayRef views,
                    const StepArgs& args) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.device() == device,
                "rmda_fused coupled phases (CUDA): all parameters must be on one device");
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::map<std::pair<at::ScalarType, int>, std::vector<size_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) {
    // a band of whole groups per block while one group fits the buffer
    const int mode = !partials_phase ? kApplyChunks
                     : band_groups(view_of(views, i), params[i].scalar_type()) > 0
                         ? kPartialBands
                         : kPartialGroups;
    buckets[{params[i].scalar_type(), mode}].push_back(i);
  }
  for (const auto& [key, members] : buckets) {
    const auto [dtype, mode] = key;
    for (size_t start = 0; start < members.size(); start += kMaxTensors) {
      CoupledTable table{};
      table.n = static_cast<int>(std::min<size_t>(kMaxTensors, members.size() - start));
      int64_t blocks = 0;
      for (int k = 0; k < table.n; ++k) {
        const size_t i = members[start + k];
        const GroupView v = view_of(views, i);
        table.w[k] = params[i].data_ptr();
        table.g[k] = partials_phase ? grads[i].data_ptr() : nullptr;
        table.w0[k] = initials[i].data_ptr();
        table.v[k] = duals[i].data_ptr();
        table.step[k] = steps[i].data_ptr();
        table.alpha[k] = partials_phase ? alphas[i].data_ptr() : nullptr;
        table.group_values[k] = group_values[i].data_ptr();
        table.outer[k] = v.outer;
        table.groups[k] = v.groups;
        table.inner[k] = v.inner;
        table.band[k] = mode == kPartialBands ? band_groups(v, dtype) : 0;
        table.first_block[k] = blocks;
        blocks += mode == kPartialBands    ? (v.groups + table.band[k] - 1) / table.band[k]
                  : mode == kPartialGroups ? v.groups
                                           : (params[i].numel() + kChunk - 1) / kChunk;
      }
      table.first_block[table.n] = blocks;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rmda_coupled_cuda", [&] {
        launch_table<scalar_t>(table, args, mode, stream);
      });
    }
  }
}

void rmda_partials_cuda(at::TensorList params, at::TensorList grads, at::TensorList initials,
                        at::TensorList duals, at::TensorList steps, at::TensorList alphas,
                        at::TensorList partials, at::IntArrayRef views, double lr,
                        const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  check_partials_args(params, grads, initials, duals, steps, alphas, partials, views,
                      lr_tensor, grad_scale, found_inf, at::kCUDA);
  constexpr const char* op = "rmda_partials_";
  const StepArgs args{lr_tensor ? lr_tensor->data_ptr() : nullptr,
                      grad_scale ? grad_scale->data_ptr() : nullptr,
                      found_inf ? found_inf->data_ptr() : nullptr,
                      lr, 0.0, 0.0,
                      scalar_kind(lr_tensor, op, "lr_tensor"),
                      scalar_kind(grad_scale, op, "grad_scale"),
                      scalar_kind(found_inf, op, "found_inf")};
  launch_coupled(true, params, grads, initials, duals, steps, alphas, partials, views, args);
}

void rmda_apply_cuda(at::TensorList params, at::TensorList initials, at::TensorList duals,
                     at::TensorList steps, at::TensorList scales, at::IntArrayRef views,
                     double momentum, const std::optional<at::Tensor>& found_inf) {
  check_apply_args(params, initials, duals, steps, scales, views, found_inf, at::kCUDA);
  const StepArgs args{nullptr, nullptr, found_inf ? found_inf->data_ptr() : nullptr,
                      0.0, momentum, 0.0,
                      kNone, kNone, scalar_kind(found_inf, "rmda_apply_", "found_inf")};
  launch_coupled(false, params, {}, initials, duals, steps, {}, scales, views, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CUDA, m) {
  m.impl("rmda_partials_", &rmda_partials_cuda);
  m.impl("rmda_apply_", &rmda_apply_cuda);
}

}  // namespace rmda_fused
