// The element arithmetic of the CUDA RMDA step and the banded walk of kBands
// (rmda_cuda.cu): how a block reads, updates and writes one band of channel groups. The
// coupled-group partials (coupled_cuda.cu) run the same pass 1 and group sums.
#pragma once

#include <cstdint>

namespace rmda_fused {
namespace {

constexpr int kThreads = 256;
// Shared buffer of a kBands block, in bytes: 48 KiB, the most a block may hold statically.
// Its entries are state-dtype (acc_t) values, so a band of a double tensor holds half as many
// elements as one of a float, half or bfloat16 tensor (6144 against 12288).
constexpr int64_t kBandBytes = 48 * 1024;

template <typename scalar_t, typename acc_t>
struct ElementStep {
  scalar_t* w;
  const scalar_t* g;
  const scalar_t* w0;
  acc_t* v;
  acc_t beta, grad_weight, thr, c, one_minus_c;

  struct Loaded {
    acc_t g, v, w0, w;  // w: only where one pass also writes W (kPlain, kSingle)
  };
  __device__ __forceinline__ Loaded load(int64_t i) const {
    return {static_cast<acc_t>(g[i]), v[i], static_cast<acc_t>(w0[i]), acc_t(0)};
  }
  __device__ __forceinline__ Loaded load_with_weight(int64_t i) const {
    return {static_cast<acc_t>(g[i]), v[i], static_cast<acc_t>(w0[i]), old_weight(i)};
  }
  // pass 1: V <- V + s*g, returns z = W0 - V/beta
  __device__ __forceinline__ acc_t dual_and_z(int64_t i, const Loaded& x) const {
    const acc_t nv = x.v + grad_weight * x.g;
    v[i] = nv;
    return x.w0 - nv / beta;
  }
  __device__ __forceinline__ acc_t dual_and_z(int64_t i) const { return dual_and_z(i, load(i)); }
  __device__ __forceinline__ acc_t old_weight(int64_t i) const { return static_cast<acc_t>(w[i]); }
  __device__ __forceinline__ void write_weight(int64_t i, acc_t w_old, acc_t z,
                                               acc_t z_weight) const {
    w[i] = static_cast<scalar_t>(w_old * one_minus_c + z_weight * z);
  }
  // z from the V stored in pass 1
  __device__ __forceinline__ acc_t stored_z(int64_t i) const {
    return static_cast<acc_t>(w0[i]) - v[i] / beta;
  }
  // pass 2 of a group
  __device__ __forceinline__ void rewrite_weight(int64_t i, acc_t z_weight) const {
    write_weight(i, old_weight(i), stored_z(i), z_weight);
  }
};

// A thread's elements j = first, first + stride, ... < end, kUnroll at a time: the loads of
// all kUnroll are issued before the first store. The compiler may not move a load above a
// store that could alias it (V is written where g and W0 are read), so a plain loop keeps
// one element per thread in flight and leaves the memory system idle between round trips.
constexpr int kUnroll = 4;
template <typename Load, typename Store>
__device__ __forceinline__ void unrolled(int64_t first, int64_t end, int64_t stride, Load load,
                                         Store store) {
  for (int64_t base = first; base < end; base += kUnroll * stride) {
    decltype(load(base)) loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < end) loaded[u] = load(base + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < end) store(base + u * stride, loaded[u]);
    }
  }
}

// The band entries j = first, first + kThreads, ... < count of one thread (j = o * span + c:
// run o, place c in it), kUnroll at a time with all their loads before the first store, as
// in unrolled(). The memory offset, start + o * row + c, and c advance by kThreads with one
// carry: no division or 64-bit multiply per element.
template <typename Load, typename Store>
__device__ __forceinline__ void walk_band(int first, int count, int span, int64_t row,
                                          int64_t start, Load load, Store store) {
  const int step_c = kThreads % span;
  const int64_t step_addr = static_cast<int64_t>(kThreads / span) * row + step_c;
  int c = first % span;
  int64_t addr = start + static_cast<int64_t>(first / span) * row + c;
  for (int base = first; base < count; base += kUnroll * kThreads) {
    int64_t addrs[kUnroll];
    int places[kUnroll];
    decltype(load(addr)) loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      addrs[u] = addr;
      places[u] = c;
      if (base + u * kThreads < count) loaded[u] = load(addr);
      addr += step_addr;
      c += step_c;
      if (c >= span) {
        c -= span;
        addr += row - span;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < count) store(base + u * kThreads, addrs[u], places[u], loaded[u]);
    }
  }
}

// Calls f(j, o, c) for j = first, first + stride, ... < count, with j = o * span + c and
// c < span; (o, c) moves by (stride / span, stride % span) and one carry, so no element pays
// for a division.
template <typename F>
__device__ __forceinline__ void walk(int64_t first, int64_t count, int64_t stride, int64_t span,
                                     F f) {
  if (first >= count) return;  // count > 0 from here on, so span > 0
  const int64_t step_o = stride / span, step_c = stride % span;
  int64_t o = first / span, c = first % span;
  for (int64_t j = first; j < count; j += stride) {
    f(j, o, c);
    o += step_o;
    c += step_c;
    if (c >= span) {
      c -= span;
      ++o;
    }
  }
}

// kBands: the block owns groups [g0, g0 + nb), i.e. `outer` runs of span = nb * inner elements,
// run o starting at o * row + g0 * inner (row = groups * inner). The buffer holds z of every
// element of the band (band index j = o * span + c), then one z_weight per group and at most
// nb + kThreads / 32 partial norms; the host picks band * (outer * inner + 2) + kThreads / 32
// <= its capacity.
struct Band {
  int64_t g0, nb, span, count, row;
  __device__ Band(int64_t outer, int64_t groups, int64_t inner, int64_t band, int64_t local)
      : g0(local * band),
        nb(groups - g0 < band ? groups - g0 : band),
        span(nb * inner),
        count(outer * span),
        row(groups * inner) {}
};

// Pass 1 of a band: V updated, z of every band element kept at buf[0, count), then each
// group's sum of z^2 in `slices` partial sums at buf + count + nb (after the z_weight slots);
// returns slices. Group norms: nb groups x S slices over the warps, S > 1 when there are
// fewer groups than warps (no warp idles while another sums a large group alone). Each
// (group, slice) sum gets its own slot, and band_group_sum adds a group's slots in order, so
// every run gives the same bits. Entry (o, k) of local group gl is z[o * span + gl * inner + k].
template <typename scalar_t, typename acc_t>
__device__ int band_pass1(const ElementStep<scalar_t, acc_t>& op, acc_t* buf, const Band& b,
                          int64_t outer, int64_t inner) {
  acc_t* const z = buf;
  // j runs fastest along a run, so consecutive threads touch consecutive addresses
  if (b.count > 0) {
    walk_band(threadIdx.x, static_cast<int>(b.count), static_cast<int>(b.span), b.row,
              b.g0 * inner,
              [&](int64_t addr) { return op.load(addr); },
              [&](int j, int64_t addr, int, const auto& x) { z[j] = op.dual_and_z(addr, x); });
  }
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  const int slices = b.nb >= kWarps ? 1 : kWarps / static_cast<int>(b.nb);
  const int64_t size = outer * inner, per_slice = (size + slices - 1) / slices;
  acc_t* const partial = buf + b.count + b.nb;  // nb * slices <= nb + kWarps slots
  const int lane = threadIdx.x & 31;
  for (int64_t task = threadIdx.x >> 5; task < b.nb * slices; task += kWarps) {
    const int64_t gl = task / slices, first = (task % slices) * per_slice;
    const int64_t last = first + per_slice < size ? first + per_slice : size;
    acc_t sum_sq = 0;
    walk(first + lane, last, 32, inner, [&](int64_t, int64_t o, int64_t k) {
      const acc_t x = z[o * b.span + gl * inner + k];
      sum_sq += x * x;
    });
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    }
    if (lane == 0) partial[task] = sum_sq;
  }
  __syncthreads();
  return slices;
}

// The sum of z^2 of local group gl after band_pass1: its slices, added in order.
template <typename acc_t>
__device__ __forceinline__ acc_t band_group_sum(const acc_t* buf, const Band& b, int slices,
                                                int64_t gl) {
  const acc_t* const partial = buf + b.count + b.nb;
  acc_t sum_sq = 0;
  for (int s = 0; s < slices; ++s) sum_sq += partial[gl * slices + s];
  return sum_sq;
}

// The fused step of one band: pass 1, the group norms and zero mask, then pass 2 writes W
// from the z kept in the buffer.
template <typename scalar_t, typename acc_t>
__device__ void band_step(const ElementStep<scalar_t, acc_t>& op, bool* mask, int64_t outer,
                          int64_t groups, int64_t inner, int64_t band, int64_t local) {
  __shared__ acc_t buf[kBandBytes / sizeof(acc_t)];
  const Band b(outer, groups, inner, band, local);
  const int slices = band_pass1(op, buf, b, outer, inner);
  acc_t* const z = buf;
  acc_t* const z_weight = buf + b.count;
  for (int64_t gl = threadIdx.x; gl < b.nb; gl += kThreads) {
    const acc_t n = ::sqrt(band_group_sum(buf, b, slices, gl));
    mask[b.g0 + gl] = n <= op.thr;  // NaN: not zero
    z_weight[gl] = n > op.thr ? op.c * ((n - op.thr) / n) : acc_t(0);
  }
  __syncthreads();
  if (b.count > 0) {
    // the group of run position c is c / inner; in float, (c + 0.5) / inner is within
    // c * 2^-23 / inner of its true value, far from the next integer for c < 2^22, so the
    // truncation is exact and no integer division is paid per element
    const float inv_inner = 1.0f / static_cast<float>(inner);
    walk_band(threadIdx.x, static_cast<int>(b.count), static_cast<int>(b.span), b.row,
              b.g0 * inner,
              [&](int64_t addr) { return op.old_weight(addr); },
              [&](int j, int64_t addr, int c, acc_t w_old) {
                const int gl = static_cast<int>((static_cast<float>(c) + 0.5f) * inv_inner);
                op.write_weight(addr, w_old, z[j], z_weight[gl]);
              });
  }
}

}  // namespace
}  // namespace rmda_fused
