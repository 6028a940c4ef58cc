// CPU kernel of rmda_fused::rmda_step_ (SPEC.md): one fused, multi-tensor RMDA step.
//
// Memory traffic (fp32, bytes per element from DRAM; g, W, W0, V read, W, V written = 24):
// - grouping 'none' and groups of one element (elementwise/L1): one streaming pass, 24 B.
// - groups contiguous in memory (output_channel, view outer == 1): per group, pass 1 reads
//   g, W0, V, writes V and sums z^2; pass 2 re-reads V, W0 from L1/L2 (one group is a few KB
//   to a few hundred KB) and updates W: 24 B from DRAM. Groups over ~L2 size (> 64K fp32
//   entries) re-read V, W0 from memory: 32 B.
// - strided groups (input_channel, outer > 1): group g's entries are `inner`-long runs, one
//   per row of the (outer, groups*inner) matrix, so no group is complete before the whole
//   tensor has been read.
//   Each tensor (or column band of kMaxBandElems columns) takes two streaming passes: pass 1
//   reads g, W0, V, writes V and sums z^2 per column; pass 2 reads V, W0, W and writes W.
//   That is 32 B/elem, minus whatever of V and W0 the caches still hold (all of it for
//   tensors of up to ~64K fp32 entries, which fit in L2).
//   Bands of up to kRowChunkElems entries are one work item (one thread, both passes). Larger
//   bands are split into row chunks that all threads share (see run_items): each pass-1
//   chunk sums z^2 into its own column buffer (width entries per chunk, i.e. 1/rows of the
//   chunk's traffic, L2-resident), the buffers are summed in chunk order (the same results
//   whatever the thread count), then pass 2 runs over the chunks. Before this, one big
//   tensor ran on one thread: a single 4M-entry 3x3 conv weight took ~3.7-5.5 ms against
//   ~2-2.8 ms now on 2 threads (its step time as 10 tensors: ~2 ms).
//   Measured alternatives, both slower on this 2-core AMD EPYC VM:
//   * column bands of whole groups sized to L2, so that pass 2 hits L2 (24 B/elem): each
//     row is then read in band-wide runs (e.g. 7 groups of a 3x3 conv: 252 B every 18 KiB),
//     which defeats the prefetchers and the TLB: 2-3x slower than two plain streams;
//   * pass 2 walking rows backwards, to start on what pass 1 left in cache: 25-35% slower;
//   * non-temporal prefetch of g in pass 1 (to keep V, W0 in L3 for pass 2): no gain.
//   So a ResNet-50 step moves about 24 B/elem for biases/norms and ~32 B/elem for the conv
//   weights with input_channel groups (output_channel and elementwise groups: 24 B/elem).
//
// Vectorized over at::vec; x86-64 builds use AVX2+FMA (see rmda_fused/_extension.py).
#if defined(__AVX2__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <cstdint>
#include <numeric>
#include <cmath>
#include <vector>

#include "rmda_common.h"

namespace rmda_fused {
namespace {

using at::vec::Vectorized;

// Work unit of the single-pass loops and of runs of contiguous groups.
constexpr int64_t kChunkElems = 1 << 15;
// Widest column band of a strided tensor (bounds its column buffers; rows of ResNet-50's
// convs are at most 4608 wide, so there a band is the whole tensor).
constexpr int64_t kMaxBandElems = 1 << 16;
// Strided bands of more than this many entries are split into row chunks of about this size
// that all threads share (see run_items).
constexpr int64_t kRowChunkElems = 1 << 17;
// Below this much work per thread, waking threads costs more than it saves.
constexpr int64_t kMinElemsPerThread = 1 << 14;

// Moves kStep consecutive elements between memory of scalar_t and two Vectorized<acc_t>.
template <typename scalar_t, typename acc_t>
struct VecIO {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <typename reduced_t>
struct ReducedIO {
  using Vec = Vectorized<float>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const reduced_t* p, Vec& a, Vec& b) { at::vec::load_to_float<reduced_t>(p, a, b); }
  static void store(reduced_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<reduced_t>(a, b).store(p);
  }
};
template <>
struct VecIO<at::BFloat16, float> : ReducedIO<at::BFloat16> {};
template <>
struct VecIO<at::Half, float> : ReducedIO<at::Half> {};

// The per-element algebra, written once for Vectorized<acc_t> and for acc_t (loop tails).
template <typename T>
inline T new_dual(T v, T g, T grad_weight) { return v + grad_weight * g; }
template <typename T>
inline T prox_input(T w0, T v, T inv_beta) { return w0 - v * inv_beta; }
template <typename T>
inline T new_weight(T w, T z, T z_weight, T one_minus_c) { return w * one_minus_c + z_weight * z; }

// The scalars of one tensor's step, computed in acc_t as the reference backend does and
// stored as double (exact for fp32 and fp64).
struct StepScalars {
  double inv_beta, grad_weight, thr, c, one_minus_c;
};

struct TensorJob {
  void *w, *v;
  const void *g, *w0;
  bool* mask;
  GroupView view;
  StepScalars s;
  at::ScalarType dtype;
};

struct WorkItem {
  int32_t job;
  int64_t begin, end;  // elements for single-pass items, groups for prox items
  int64_t cost;        // elements touched, for balancing the threads
};

// A strided band of whole groups [first, last) split into row chunks of `rows` rows; chunk
// k's column sums of z^2 lie at partials + k * width (in acc_t), reduced into chunk 0's.
struct SplitBand {
  int32_t job;
  int64_t first, last, rows, chunks;
  void* partials;
};

// Progress of one split band within the step's parallel region.
struct alignas(64) BandSync {
  std::atomic<int64_t> next1{0}, done1{0}, next2{0};
  std::atomic<bool> ready{false};
};

template <typename scalar_t, typename acc_t>
struct Kernel {
  using IO = VecIO<scalar_t, acc_t>;
  using AccIO = VecIO<acc_t, acc_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = IO::kStep;
  static_assert(IO::kStep == AccIO::kStep, "param and state vectors must cover the same span");

  scalar_t* w;
  const scalar_t* g;
  const scalar_t* w0;
  acc_t* v;
  bool* mask;
  acc_t inv_beta, grad_weight, thr, c, one_minus_c;
  GroupView view;
  bool prox;

  Kernel(const TensorJob& job, bool prox_)
      : w(static_cast<scalar_t*>(job.w)), g(static_cast<const scalar_t*>(job.g)),
        w0(static_cast<const scalar_t*>(job.w0)), v(static_cast<acc_t*>(job.v)), mask(job.mask),
        inv_beta(job.s.inv_beta), grad_weight(job.s.grad_weight), thr(job.s.thr), c(job.s.c),
        one_minus_c(job.s.one_minus_c), view(job.view), prox(prox_) {}

  // Pass 1 at index i: V <- V + s*g (stored), returns z = W0 - V/beta.
  acc_t dual_and_z(int64_t i) const {
    const acc_t nv = new_dual<acc_t>(v[i], static_cast<acc_t>(g[i]), grad_weight);
    v[i] = nv;
    return prox_input<acc_t>(static_cast<acc_t>(w0[i]), nv, inv_beta);
  }
  void dual_and_z(int64_t i, Vec& z0, Vec& z1) const {
    Vec g0, g1, a0, a1, v0, v1;
    IO::load(g + i, g0, g1);
    AccIO::load(v + i, v0, v1);
    const Vec gw(grad_weight);
    v0 = new_dual(v0, g0, gw);
    v1 = new_dual(v1, g1, gw);
    AccIO::store(v + i, v0, v1);
    IO::load(w0 + i, a0, a1);
    const Vec b(inv_beta);
    z0 = prox_input(a0, v0, b);
    z1 = prox_input(a1, v1, b);
  }
  // Pass 2 at index i, V already updated: W <- (1-c) W + z_weight * z.
  void write_weight(int64_t i, acc_t z_weight) const {
    const acc_t z = prox_input<acc_t>(static_cast<acc_t>(w0[i]), v[i], inv_beta);
    w[i] = static_cast<scalar_t>(new_weight<acc_t>(static_cast<acc_t>(w[i]), z, z_weight, one_minus_c));
  }
  void write_weight(int64_t i, const Vec& zw0, const Vec& zw1) const {
    Vec a0, a1, v0, v1, w_0, w_1;
    IO::load(w0 + i, a0, a1);
    AccIO::load(v + i, v0, v1);
    IO::load(w + i, w_0, w_1);
    const Vec b(inv_beta), omc(one_minus_c);
    IO::store(w + i, new_weight(w_0, prox_input(a0, v0, b), zw0, omc),
              new_weight(w_1, prox_input(a1, v1, b), zw1, omc));
  }
  void write_weight(int64_t i, const Vec& z0, const Vec& z1, const Vec& zw0, const Vec& zw1) const {
    Vec w_0, w_1;
    IO::load(w + i, w_0, w_1);
    const Vec omc(one_minus_c);
    IO::store(w + i, new_weight(w_0, z0, zw0, omc), new_weight(w_1, z1, zw1, omc));
  }

  // No prox: one pass, W <- (1-c) W + c z.
  void plain(int64_t begin, int64_t end) const {
    int64_t i = begin;
    const Vec cv(c);
    for (; i + kStep <= end; i += kStep) {
      Vec z0, z1;
      dual_and_z(i, z0, z1);
      write_weight(i, z0, z1, cv, cv);
    }
    for (; i < end; ++i) {
      const acc_t z = dual_and_z(i);
      w[i] = static_cast<scalar_t>(new_weight<acc_t>(static_cast<acc_t>(w[i]), z, c, one_minus_c));
    }
  }

  // Groups of one entry (L1): n = |z|, one pass; mask[i] is whether z_i became 0.
  acc_t single_scale(acc_t z) const {
    const acc_t n = std::abs(z);
    return n > thr ? c * ((n - thr) / n) : acc_t(0);
  }
  void elementwise(int64_t begin, int64_t end) const {
    int64_t i = begin;
    const Vec cv(c), tv(thr), zero(0);
    acc_t kept[kStep];
    for (; i + kStep <= end; i += kStep) {
      Vec z0, z1;
      dual_and_z(i, z0, z1);
      const Vec n0 = z0.abs(), n1 = z1.abs();
      // (n - thr)/n is NaN where n == 0; blendv keeps those lanes at 0
      const Vec zw0 = Vec::blendv(zero, cv * ((n0 - tv) / n0), n0 > tv);
      const Vec zw1 = Vec::blendv(zero, cv * ((n1 - tv) / n1), n1 > tv);
      write_weight(i, z0, z1, zw0, zw1);
      n0.gt(tv).store(kept);
      n1.gt(tv).store(kept + Vec::size());
      for (int64_t k = 0; k < kStep; ++k) mask[i + k] = kept[k] == acc_t(0);
    }
    for (; i < end; ++i) {
      const acc_t z = dual_and_z(i);
      mask[i] = !(std::abs(z) > thr);
      w[i] = static_cast<scalar_t>(new_weight<acc_t>(static_cast<acc_t>(w[i]), z, single_scale(z), one_minus_c));
    }
  }

  // Group scale folded with c; also records the group's zero mask.
  acc_t group_weight(acc_t sum_sq, int64_t group) const {
    const acc_t n = std::sqrt(sum_sq);
    const bool keep = n > thr;
    mask[group] = !keep;
    return keep ? c * ((n - thr) / n) : acc_t(0);
  }

  // Contiguous groups (view outer == 1): both passes per group, the second from cache.
  void contiguous_groups(int64_t first, int64_t last, int64_t size) const {
    acc_t lanes[Vec::size()];
    for (int64_t grp = first; grp < last; ++grp) {
      const int64_t begin = grp * size, end = begin + size;
      Vec sq0(0), sq1(0);
      int64_t i = begin;
      for (; i + kStep <= end; i += kStep) {
        Vec z0, z1;
        dual_and_z(i, z0, z1);
        sq0 = at::vec::fmadd(z0, z0, sq0);
        sq1 = at::vec::fmadd(z1, z1, sq1);
      }
      (sq0 + sq1).store(lanes);
      acc_t sum_sq = 0;
      for (int64_t k = 0; k < Vec::size(); ++k) sum_sq += lanes[k];
      for (; i < end; ++i) {
        const acc_t z = dual_and_z(i);
        sum_sq += z * z;
      }
      const acc_t zw = group_weight(sum_sq, grp);
      const Vec zwv(zw);
      for (i = begin; i + kStep <= end; i += kStep) write_weight(i, zwv, zwv);
      for (; i < end; ++i) write_weight(i, zw);
    }
  }

  // Strided groups, band of columns [col0, col0 + width) of the (outer, groups*inner)
  // matrix, rows [r0, r1). Per-column buffers (band width, not tensor size) keep both passes
  // vectorized whatever `inner` is (1 for linear layers, 9 for 3x3 convs).
  void accumulate_rows(acc_t* col, int64_t col0, int64_t width, int64_t r0, int64_t r1) const {
    const int64_t row = view.groups * view.inner;
    for (int64_t o = r0; o < r1; ++o) {
      const int64_t base = o * row + col0;
      int64_t j = 0;
      for (; j + kStep <= width; j += kStep) {
        Vec z0, z1, q0, q1;
        dual_and_z(base + j, z0, z1);
        AccIO::load(col + j, q0, q1);
        AccIO::store(col + j, at::vec::fmadd(z0, z0, q0), at::vec::fmadd(z1, z1, q1));
      }
      for (; j < width; ++j) {
        const acc_t z = dual_and_z(base + j);
        col[j] += z * z;
      }
    }
  }
  // Turns the column sums of groups [first, last) into each column's z weight.
  void finish_groups(acc_t* col, int64_t first, int64_t last) const {
    for (int64_t grp = first; grp < last; ++grp) {
      acc_t* cols = col + (grp - first) * view.inner;
      acc_t sum_sq = 0;
      for (int64_t k = 0; k < view.inner; ++k) sum_sq += cols[k];
      std::fill(cols, cols + view.inner, group_weight(sum_sq, grp));
    }
  }
  // Forwards over rows: walking them backwards, to start pass 2 on the rows pass 1 left in
  // cache, measured 25-35% slower here (the prefetchers follow forward streams best).
  void write_rows(const acc_t* col, int64_t col0, int64_t width, int64_t r0, int64_t r1) const {
    const int64_t row = view.groups * view.inner;
    for (int64_t o = r0; o < r1; ++o) {
      const int64_t base = o * row + col0;
      int64_t j = 0;
      for (; j + kStep <= width; j += kStep) {
        Vec zw0, zw1;
        AccIO::load(col + j, zw0, zw1);
        write_weight(base + j, zw0, zw1);
      }
      for (; j < width; ++j) write_weight(base + j, col[j]);
    }
  }

  // A band of whole groups [first, last) of a strided tensor, both passes over all rows.
  void strided_groups(int64_t first, int64_t last) const {
    const int64_t col0 = first * view.inner, width = (last - first) * view.inner;
    std::vector<acc_t> col(width, acc_t(0));  // sum of z^2 per column, then z weight
    accumulate_rows(col.data(), col0, width, 0, view.outer);
    finish_groups(col.data(), first, last);
    write_rows(col.data(), col0, width, 0, view.outer);
  }

  // Row chunk k of a split band, pass 1: the chunk's own column sums of z^2.
  void chunk_pass1(const SplitBand& b, int64_t k) const {
    const int64_t width = (b.last - b.first) * view.inner;
    acc_t* col = static_cast<acc_t*>(b.partials) + k * width;
    std::fill(col, col + width, acc_t(0));
    accumulate_rows(col, b.first * view.inner, width, k * b.rows,
                    std::min(view.outer, (k + 1) * b.rows));
  }
  // Sums a split band's chunk partials in chunk order (so the result does not depend on the
  // thread count) into the first chunk's buffer, then turns them into z weights.
  void reduce_band(const SplitBand& b) const {
    const int64_t width = (b.last - b.first) * view.inner;
    acc_t* col = static_cast<acc_t*>(b.partials);
    for (int64_t k = 1; k < b.chunks; ++k) {
      const acc_t* part = col + k * width;
      int64_t j = 0;
      for (; j + kStep <= width; j += kStep) {
        Vec a0, a1, p0, p1;
        AccIO::load(col + j, a0, a1);
        AccIO::load(part + j, p0, p1);
        AccIO::store(col + j, a0 + p0, a1 + p1);
      }
      for (; j < width; ++j) col[j] += part[j];
    }
    finish_groups(col, b.first, b.last);
  }
  void chunk_pass2(const SplitBand& b, int64_t k) const {
    write_rows(static_cast<const acc_t*>(b.partials), b.first * view.inner,
               (b.last - b.first) * view.inner, k * b.rows, std::min(view.outer, (k + 1) * b.rows));
  }

  void run(const WorkItem& item) const {
    if (!prox) {
      plain(item.begin, item.end);
    } else if (view.group_size() == 1) {
      elementwise(item.begin, item.end);
    } else if (view.outer == 1) {
      contiguous_groups(item.begin, item.end, view.inner);
    } else {
      strided_groups(item.begin, item.end);
    }
  }
};

template <typename acc_t>
StepScalars advance_scalars(const at::Tensor& step, const at::Tensor& alpha, double lr,
                            const std::optional<double>& grad_scale, double momentum, double lam,
                            int64_t group_size) {
  acc_t* t = step.data_ptr<acc_t>();
  acc_t* a = alpha.data_ptr<acc_t>();
  *t = *t + acc_t(1);
  const acc_t beta = std::sqrt(*t);
  const acc_t s = beta * static_cast<acc_t>(lr);
  *a = *a + s;
  const acc_t grad_weight = grad_scale ? s / static_cast<acc_t>(*grad_scale) : s;
  const acc_t tau = (*a / beta) * static_cast<acc_t>(lam);
  const acc_t thr = tau * static_cast<acc_t>(std::sqrt(static_cast<double>(group_size)));
  // z = W0 - V * (1/beta): a multiply instead of a divide per element (within an ulp of
  // the reference's V / beta); at ~40 GB/s per core the divide is not free.
  return StepScalars{acc_t(1) / beta, grad_weight, thr, static_cast<acc_t>(momentum),
                     static_cast<acc_t>(1.0 - momentum)};
}

// Splits a tensor into work items: chunks of elements, runs of contiguous groups, or column
// bands of strided groups (the whole tensor unless its rows exceed kMaxBandElems). A band of
// more than kRowChunkElems entries is split into row chunks instead (a SplitBand in `bands`).
void append_items(std::vector<WorkItem>& items, std::vector<SplitBand>& bands, int32_t job,
                  const TensorJob& tj, bool prox, int64_t numel) {
  if (!prox || tj.view.group_size() == 1) {
    for (int64_t b = 0; b < numel; b += kChunkElems) {
      const int64_t e = std::min(numel, b + kChunkElems);
      items.push_back({job, b, e, e - b});
    }
    return;
  }
  const int64_t size = std::max<int64_t>(tj.view.group_size(), 1);
  const bool strided = tj.view.outer != 1;
  const int64_t per_item = strided
      ? std::max<int64_t>(1, kMaxBandElems / std::max<int64_t>(tj.view.inner, 1))
      : std::max<int64_t>(1, kChunkElems / size);
  for (int64_t b = 0; b < tj.view.groups; b += per_item) {
    const int64_t e = std::min(tj.view.groups, b + per_item);
    const int64_t elements = std::max<int64_t>(1, (e - b) * size);
    if (strided) {
      const int64_t width = std::max<int64_t>(1, (e - b) * tj.view.inner);
      const int64_t rows = std::max<int64_t>(1, kRowChunkElems / width);
      const int64_t chunks = (tj.view.outer + rows - 1) / rows;
      if (chunks > 1) {
        bands.push_back({job, b, e, rows, chunks, nullptr});
        continue;
      }
    }
    items.push_back({job, b, e, strided ? elements * 4 / 3 : elements});  // 32 vs 24 B/elem
  }
}

template <typename F>
void with_kernel(const TensorJob& job, bool prox, const F& f) {
  switch (job.dtype) {
    case at::kFloat: f(Kernel<float, float>(job, prox)); break;
    case at::kDouble: f(Kernel<double, double>(job, prox)); break;
    case at::kBFloat16: f(Kernel<at::BFloat16, float>(job, prox)); break;
    case at::kHalf: f(Kernel<at::Half, float>(job, prox)); break;
    default: TORCH_CHECK(false, "rmda_step_: unsupported parameter dtype ", job.dtype);
  }
}

// Runs the step in one parallel region (one barrier per step: on a loaded machine every
// barrier waits for the slowest, possibly descheduled, thread).
// Split bands come first, one after another, every thread on each: threads claim pass-1 row
// chunks from a shared counter until none is left; the thread that finishes the band's last
// one sums the chunk partials (in chunk order, so results do not depend on the thread count)
// into z weights and marks the band ready; the others meanwhile run their own small items;
// then all claim pass-2 chunks. So both passes of a band stay close in time (pass 2 finds in
// L3 what pass 1 left), and no thread waits on a chunk that nobody is running.
// The other items go to threads largest first, each to the least loaded thread; a thread
// runs its items in memory order.
void run_items(const std::vector<TensorJob>& jobs, const std::vector<WorkItem>& items,
               std::vector<SplitBand>& bands, bool prox) {
  if (items.empty() && bands.empty()) return;
  int64_t total = 0;
  for (const auto& it : items) total += it.cost;
  for (const auto& b : bands) total += (b.last - b.first) * jobs[b.job].view.group_size() * 4 / 3;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), total / kMinElemsPerThread));
  std::vector<std::vector<size_t>> share(parts);
  if (parts == 1) {
    share[0].resize(items.size());
    std::iota(share[0].begin(), share[0].end(), size_t(0));
  } else {
    std::vector<size_t> order(items.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return items[a].cost > items[b].cost; });
    std::vector<int64_t> load(parts, 0);
    for (size_t k : order) {
      const auto t = std::min_element(load.begin(), load.end()) - load.begin();
      load[t] += items[k].cost;
      share[t].push_back(k);
    }
    for (auto& mine : share) std::sort(mine.begin(), mine.end());
  }
  // Column sums of the split bands: chunks x width per band, 64-byte aligned, kept across steps.
  thread_local std::vector<double> arena;
  size_t doubles = 0;
  std::vector<size_t> offset(bands.size());
  for (size_t b = 0; b < bands.size(); ++b) {
    const TensorJob& tj = jobs[bands[b].job];
    const size_t acc_bytes = tj.dtype == at::kDouble ? 8 : 4;
    const size_t width = (bands[b].last - bands[b].first) * tj.view.inner;
    offset[b] = doubles;
    doubles += (bands[b].chunks * width * acc_bytes + 63) / 64 * 8;
  }
  if (arena.size() < doubles + 8) arena.resize(doubles + 8);
  double* base = reinterpret_cast<double*>(
      (reinterpret_cast<uintptr_t>(arena.data()) + 63) & ~uintptr_t(63));
  for (size_t b = 0; b < bands.size(); ++b) bands[b].partials = base + offset[b];
  std::unique_ptr<BandSync[]> sync(new BandSync[std::max<size_t>(bands.size(), 1)]);

  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // this thread's items, in order (a thread may be handed several parts)
    std::vector<size_t> mine;
    for (int64_t t = begin; t < end; ++t) mine.insert(mine.end(), share[t].begin(), share[t].end());
    size_t next_item = 0;
    auto run_item = [&](size_t k) {
      with_kernel(jobs[items[k].job], prox, [&](const auto& kernel) { kernel.run(items[k]); });
    };
    for (size_t b = 0; b < bands.size(); ++b) {
      const SplitBand& band = bands[b];
      BandSync& st = sync[b];
      with_kernel(jobs[band.job], prox, [&](const auto& kernel) {
        for (int64_t k; (k = st.next1.fetch_add(1, std::memory_order_relaxed)) < band.chunks;) {
          kernel.chunk_pass1(band, k);
          if (st.done1.fetch_add(1, std::memory_order_acq_rel) == band.chunks - 1) {
            kernel.reduce_band(band);
            st.ready.store(true, std::memory_order_release);
          }
        }
        // every chunk is claimed by a running thread: wait for them, doing own work meanwhile
        while (!st.ready.load(std::memory_order_acquire)) {
          if (next_item < mine.size()) {
            run_item(mine[next_item++]);
          } else {
            std::this_thread::yield();
          }
        }
        for (int64_t k; (k = st.next2.fetch_add(1, std::memory_order_relaxed)) < band.chunks;) {
          kernel.chunk_pass2(band, k);
        }
      });
    }
    for (; next_item < mine.size(); ++next_item) run_item(mine[next_item]);
  });
}

void rmda_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList initials,
                   at::TensorList duals, at::TensorList steps, at::TensorList alphas,
                   at::TensorList zero_groups, at::IntArrayRef views, double lr,
                   double momentum, double lam, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  check_step_args(params, grads, initials, duals, steps, alphas, zero_groups, views, lr_tensor,
                  grad_scale, found_inf, at::kCPU);
  // On CPU reading these scalars costs nothing; found_inf stops the step before t moves.
  if (found_inf && found_inf->item<double>() != 0.0) return;
  if (lr_tensor) lr = lr_tensor->item<double>();
  std::optional<double> scale;
  if (grad_scale) scale = grad_scale->item<double>();
  const bool prox = !views.empty();

  std::vector<TensorJob> jobs;
  std::vector<WorkItem> items;
  std::vector<SplitBand> bands;
  jobs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = p.numel();
    const GroupView view = prox ? view_of(views, i) : GroupView{1, numel, 1};
    const int64_t group_size = prox ? view.group_size() : 1;
    StepScalars s = p.scalar_type() == at::kDouble
        ? advance_scalars<double>(steps[i], alphas[i], lr, scale, momentum, lam, group_size)
        : advance_scalars<float>(steps[i], alphas[i], lr, scale, momentum, lam, group_size);
    jobs.push_back(TensorJob{p.data_ptr(), duals[i].data_ptr(), grads[i].data_ptr(),
                             initials[i].data_ptr(),
                             prox ? zero_groups[i].data_ptr<bool>() : nullptr, view, s,
                             p.scalar_type()});
    append_items(items, bands, static_cast<int32_t>(i), jobs.back(), prox, numel);
  }
  run_items(jobs, items, bands, prox);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmda_fused, CPU, m) {
  m.impl("rmda_step_", &rmda_step_cpu);
}

}  // namespace rmda_fused
