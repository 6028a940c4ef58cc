// Work plan of the CPU step: which passes each layout takes, and how they share the threads.
//
// Memory traffic (fp32, bytes per element from DRAM; g, W, W0, V read, W, V written = 24;
// docs/algorithm.md, "Memory traffic"):
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
//   whatever the thread count), then pass 2 runs over the chunks. A single 4M-entry 3x3 conv
//   weight takes ~2-2.8 ms a step split this way on 2 threads, against ~3.7-5.5 ms as one
//   work item on one thread (the same entries as 10 tensors: ~2 ms).
//   Alternatives measured, none faster:
//   * column bands of whole groups sized to L2, so that pass 2 hits L2 (24 B/elem): each
//     row is then read in band-wide runs (e.g. 7 groups of a 3x3 conv: 252 B every 18 KiB),
//     which defeats the prefetchers and the TLB: 2-3x slower than two plain streams;
//   * pass 2 walking rows backwards, to start on what pass 1 left in cache: 25-35% slower;
//   * non-temporal prefetch of g in pass 1 (to keep V, W0 in L3 for pass 2): no gain.
//   So a ResNet-50 step moves about 24 B/elem for biases/norms and ~32 B/elem for the conv
//   weights with input_channel groups (output_channel and elementwise groups: 24 B/elem).
// - the coupled-group phases (coupled_cpu.cpp) cut every tensor as the strided groups are
//   (append_column_bands; a view with outer == 1 is a band of one row) and make one
//   streaming pass each: rmda_partials_ is pass 1 (reads g, W0, V, writes V: 16 B), the
//   group sums going to the partials instead of into a pass 2; rmda_apply_ is pass 2 (reads
//   W0, V, W, writes W: 16 B) with column weights c * scale. 32 B/elem in all, as
//   input_channel's two passes.
// All timings in this file were measured on a 2-core AMD EPYC VM (1 MiB L2 per core, 8 MiB L3),
// torch 2.14.1.
// rmda_kernel.h comes first: it sets the ISA of ATen's vec headers (see cpu/vec_io.h).
#include "cpu/rmda_kernel.h"
#include "cpu/work_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

namespace rmda_fused::cpu {
namespace {

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

// Two passes over strided groups move 32 B/elem against 24 B for the others (see above).
int64_t strided_cost(int64_t elements) { return elements * 4 / 3; }

// Progress of one split band within the step's parallel region.
struct alignas(64) BandSync {
  std::atomic<int64_t> next_pass1_chunk{0}, pass1_chunks_done{0}, next_pass2_chunk{0};
  std::atomic<bool> weights_ready{false};
};

template <typename F>
void with_kernel(const TensorJob& job, Phase phase, const F& f) {
  switch (job.dtype) {
    case at::kFloat: f(Kernel<float, float>(job, phase)); break;
    case at::kDouble: f(Kernel<double, double>(job, phase)); break;
    case at::kBFloat16: f(Kernel<at::BFloat16, float>(job, phase)); break;
    case at::kHalf: f(Kernel<at::Half, float>(job, phase)); break;
    default: TORCH_CHECK(false, "rmda_fused: unsupported parameter dtype ", job.dtype);
  }
}

// Which items each of `num_parts` threads runs: largest first, each to the least loaded
// thread; a thread then runs its items in memory order.
std::vector<std::vector<size_t>> share_items(const std::vector<WorkItem>& items,
                                             int64_t num_parts) {
  std::vector<std::vector<size_t>> items_of_part(num_parts);
  if (num_parts == 1) {
    items_of_part[0].resize(items.size());
    std::iota(items_of_part[0].begin(), items_of_part[0].end(), size_t(0));
    return items_of_part;
  }
  std::vector<size_t> by_cost(items.size());
  std::iota(by_cost.begin(), by_cost.end(), size_t(0));
  std::stable_sort(by_cost.begin(), by_cost.end(),
                   [&](size_t a, size_t b) { return items[a].cost > items[b].cost; });
  std::vector<int64_t> load(num_parts, 0);
  for (size_t item : by_cost) {
    const auto part = std::min_element(load.begin(), load.end()) - load.begin();
    load[part] += items[item].cost;
    items_of_part[part].push_back(item);
  }
  for (auto& mine : items_of_part) std::sort(mine.begin(), mine.end());
  return items_of_part;
}

// Points each band's column_sums into one 64-byte aligned buffer of chunks x width entries
// per band, kept per thread across steps so that a step allocates nothing.
void place_column_sums(const std::vector<TensorJob>& jobs, std::vector<SplitBand>& bands) {
  thread_local std::vector<double> arena;
  size_t arena_doubles = 0;
  std::vector<size_t> offset(bands.size());
  for (size_t b = 0; b < bands.size(); ++b) {
    const TensorJob& job = jobs[bands[b].job];
    const size_t state_bytes = job.dtype == at::kDouble ? 8 : 4;
    const size_t width = (bands[b].last_group - bands[b].first_group) * job.view.inner;
    offset[b] = arena_doubles;
    arena_doubles += (bands[b].chunks * width * state_bytes + 63) / 64 * 8;
  }
  if (arena.size() < arena_doubles + 8) arena.resize(arena_doubles + 8);
  double* aligned = reinterpret_cast<double*>(
      (reinterpret_cast<uintptr_t>(arena.data()) + 63) & ~uintptr_t(63));
  for (size_t b = 0; b < bands.size(); ++b) bands[b].column_sums = aligned + offset[b];
}

}  // namespace

void append_items(std::vector<WorkItem>& items, std::vector<SplitBand>& bands,
                  int32_t job_index, const TensorJob& job, bool prox, int64_t numel) {
  if (!prox || job.view.group_size() == 1) {
    for (int64_t begin = 0; begin < numel; begin += kChunkElems) {
      const int64_t end = std::min(numel, begin + kChunkElems);
      items.push_back({job_index, begin, end, end - begin});
    }
    return;
  }
  if (job.view.outer != 1) {
    append_column_bands(items, bands, job_index, job.view);
    return;
  }
  const int64_t group_size = std::max<int64_t>(job.view.group_size(), 1);
  const int64_t groups_per_item = std::max<int64_t>(1, kChunkElems / group_size);
  for (int64_t first = 0; first < job.view.groups; first += groups_per_item) {
    const int64_t last = std::min(job.view.groups, first + groups_per_item);
    items.push_back({job_index, first, last, (last - first) * group_size});
  }
}

void append_column_bands(std::vector<WorkItem>& items, std::vector<SplitBand>& bands,
                         int32_t job_index, const GroupView& view) {
  const int64_t groups_per_band =
      std::max<int64_t>(1, kMaxBandElems / std::max<int64_t>(view.inner, 1));
  for (int64_t first = 0; first < view.groups; first += groups_per_band) {
    const int64_t last = std::min(view.groups, first + groups_per_band);
    const int64_t width = std::max<int64_t>(1, (last - first) * view.inner);
    const int64_t rows_per_chunk = std::max<int64_t>(1, kRowChunkElems / width);
    const int64_t chunks = (view.outer + rows_per_chunk - 1) / rows_per_chunk;
    if (chunks > 1) {
      bands.push_back({job_index, first, last, rows_per_chunk, chunks, nullptr});
    } else {
      items.push_back({job_index, first, last,
                       strided_cost(std::max<int64_t>(1, (last - first) * view.group_size()))});
    }
  }
}

// One parallel region per step: each barrier waits for the slowest, possibly descheduled,
// thread, which a loaded machine makes expensive.
// Split bands come first, one after another, every thread on each: threads claim pass-1 row
// chunks from a shared counter until none is left; the thread that finishes the band's last
// one sums the chunk partials (in chunk order, so results do not depend on the thread count)
// into z weights and marks the band ready; the others meanwhile run their own small items;
// then all claim pass-2 chunks. So both passes of a band stay close in time (pass 2 finds in
// L3 what pass 1 left), and no thread waits on a chunk that nobody is running.
// rmda_partials_ has no pass 2: the thread that finishes a band's last chunk writes its
// partials and nobody waits. rmda_apply_'s pass 1 is one unit, filling the band's column
// weights from the scales; then all share the pass-2 chunks.
void run_items(const std::vector<TensorJob>& jobs, const std::vector<WorkItem>& items,
               std::vector<SplitBand>& bands, Phase phase) {
  if (items.empty() && bands.empty()) return;
  int64_t total_cost = 0;
  for (const auto& item : items) total_cost += item.cost;
  for (const auto& band : bands) {
    total_cost +=
        strided_cost((band.last_group - band.first_group) * jobs[band.job].view.group_size());
  }
  const int64_t num_parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), total_cost / kMinElemsPerThread));
  const std::vector<std::vector<size_t>> items_of_part = share_items(items, num_parts);
  place_column_sums(jobs, bands);
  std::unique_ptr<BandSync[]> band_sync(new BandSync[std::max<size_t>(bands.size(), 1)]);

  at::parallel_for(0, num_parts, 1, [&](int64_t begin, int64_t end) {
    // this thread's items, in order (a thread may be handed several parts)
    std::vector<size_t> mine;
    for (int64_t part = begin; part < end; ++part) {
      mine.insert(mine.end(), items_of_part[part].begin(), items_of_part[part].end());
    }
    size_t next_item = 0;
    auto run_item = [&](size_t index) {
      with_kernel(jobs[items[index].job], phase,
                  [&](const auto& kernel) { kernel.run(items[index]); });
    };
    for (size_t b = 0; b < bands.size(); ++b) {
      const SplitBand& band = bands[b];
      BandSync& sync = band_sync[b];
      with_kernel(jobs[band.job], phase, [&](const auto& kernel) {
        const int64_t units = kernel.pass1_units(band);
        for (int64_t unit;
             (unit = sync.next_pass1_chunk.fetch_add(1, std::memory_order_relaxed)) < units;) {
          kernel.band_pass1(band, unit);
          if (sync.pass1_chunks_done.fetch_add(1, std::memory_order_acq_rel) == units - 1) {
            kernel.finish_band(band);
            sync.weights_ready.store(true, std::memory_order_release);
          }
        }
        if (!kernel.has_pass2()) return;  // rmda_partials_: the band is done
        // every chunk is claimed by a running thread: wait for them, doing own work meanwhile
        while (!sync.weights_ready.load(std::memory_order_acquire)) {
          if (next_item < mine.size()) {
            run_item(mine[next_item++]);
          } else {
            std::this_thread::yield();
          }
        }
        for (int64_t chunk;
             (chunk = sync.next_pass2_chunk.fetch_add(1, std::memory_order_relaxed)) <
             band.chunks;) {
          kernel.chunk_pass2(band, chunk);
        }
      });
    }
    for (; next_item < mine.size(); ++next_item) run_item(mine[next_item]);
  });
}

}  // namespace rmda_fused::cpu
