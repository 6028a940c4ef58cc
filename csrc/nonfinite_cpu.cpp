// CPU kernel of rmda_fused::nonfinite_: found_inf <- 1 when any entry of any tensor is a NaN
// or an infinity. One parallel region over chunks of every tensor: checking a model's
// gradients one torch reduction at a time pays a dispatch and a parallel region per tensor,
// which for ResNet-50's 161 tensors cost about as much as reading them.
// cpu/vec_io.h comes first: it sets the ISA of ATen's vec headers.
#include "cpu/vec_io.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rmda_common.h"

namespace rmda_fused {
namespace {

constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  const void* data;
  at::ScalarType dtype;
  int64_t begin, end;
};

// x - x is 0 for every finite x and NaN for a NaN or an infinity; the sum of those keeps the
// NaN, so a chunk is checked with one subtraction and one addition per entry.
template <typename scalar_t>
bool chunk_is_finite(const scalar_t* x, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = cpu::VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  Vec acc(acc_t(0));
  int64_t e = begin;
  for (; e + IO::kStep <= end; e += IO::kStep) {
    Vec low, high;
    IO::load(x + e, low, high);
    acc = acc + (low - low) + (high - high);
  }
  acc_t tail = 0;
  for (; e < end; ++e) {
    const acc_t v = static_cast<acc_t>(x[e]);
    tail += v - v;
  }
  return !std::isnan(at::vec::vec_reduce_all<acc_t>(
             [](Vec a, Vec b) { return a + b; }, acc)) && !std::isnan(tail);
}

void nonfinite_cpu(at::TensorList tensors, const at::Tensor& found_inf) {
  const std::vector<at::Tensor> dense = nonfinite_inputs(tensors, found_inf);
  std::vector<Chunk> chunks;
  for (const at::Tensor& t : dense) {
    for (int64_t begin = 0; begin < t.numel(); begin += kChunk) {
      chunks.push_back(
          {t.data_ptr(), t.scalar_type(), begin, std::min(begin + kChunk, t.numel())});
    }
  }
  std::atomic<bool> bad{false};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi && !bad.load(std::memory_order_relaxed); ++k) {
      const Chunk& c = chunks[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "nonfinite_cpu", [&] {
        if (!chunk_is_finite(static_cast<const scalar_t*>(c.data), c.begin, c.end)) {
          bad.store(true, std::memory_order_relaxed);
        }
      });
    }
  });
  if (bad.load()) found_inf.fill_(1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CPU, m) {
  m.impl("nonfinite_", &nonfinite_cpu);
}

}  // namespace rmda_fused
