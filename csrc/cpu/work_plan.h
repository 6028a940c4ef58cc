// Work planning of the CPU step: cutting each tensor into work units (append_items) and
// running all of them in one parallel region (run_items). The memory traffic each layout
// costs, and the alternatives measured, are explained at the top of work_plan.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/step_job.h"

namespace rmda_fused::cpu {

// Appends tensor `job_index` of the step (described by `job`, `numel` elements) as work
// items: chunks of elements, runs of contiguous groups, or column bands of strided groups
// (append_column_bands). `prox` is false for grouping 'none'.
void append_items(std::vector<WorkItem>& items, std::vector<SplitBand>& bands,
                  int32_t job_index, const TensorJob& job, bool prox, int64_t numel);

// Appends the tensor of `view` as column bands of whole groups of its (outer, groups*inner)
// rows: a band of up to kRowChunkElems entries is one work item; a bigger one goes to
// `bands`, split into row chunks that all threads share. The coupled phases cut every
// tensor so.
void append_column_bands(std::vector<WorkItem>& items, std::vector<SplitBand>& bands,
                         int32_t job_index, const GroupView& view);

// Runs every item and band in the passes of `phase` on at::get_num_threads() threads;
// results do not depend on the thread count. Sets the bands' column_sums buffers.
void run_items(const std::vector<TensorJob>& jobs, const std::vector<WorkItem>& items,
               std::vector<SplitBand>& bands, Phase phase);

}  // namespace rmda_fused::cpu
