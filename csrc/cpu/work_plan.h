// Work planning of the CPU step: cutting each tensor into work units (append_items) and
// running all of them in one parallel region (run_items). The memory traffic each layout
// costs, and the alternatives measured, are explained at the top of work_plan.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/step_job.h"

namespace rmda_fused::cpu {

// Appends tensor `job_index` of the step (described by `job`, `numel` elements) as work
// items: chunks of elements, runs of contiguous groups, or column bands of strided groups;
// a strided band too big for one thread goes to `bands` instead, split into row chunks.
// `prox` is false for grouping 'none'.
void append_items(std::vector<WorkItem>& items, std::vector<SplitBand>& bands,
                  int32_t job_index, const TensorJob& job, bool prox, int64_t numel);

// Runs every item and band of the step on at::get_num_threads() threads; results do not
// depend on the thread count. Sets the bands' column_sums buffers.
void run_items(const std::vector<TensorJob>& jobs, const std::vector<WorkItem>& items,
               std::vector<SplitBand>& bands, bool prox);

}  // namespace rmda_fused::cpu
