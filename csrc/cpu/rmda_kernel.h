// The per-element algebra of the CPU step (docs/algorithm.md, "The update") and its passes
// over one tensor: Kernel<scalar_t, acc_t> runs the WorkItems and SplitBands that the work
// plan (work_plan.h) cuts, vectorized with at::vec, for the fused step and for the two kernel
// phases of a coupled-group step; advance_scalars moves a tensor's t and A. Which pass runs
// where, and why, is explained at the top of work_plan.cpp.
#pragma once

#include "cpu/vec_io.h"  // first: it sets the ISA of the ATen vec headers

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cpu/step_job.h"

namespace rmda_fused::cpu {

// The algebra, written once for Vectorized<acc_t> and for acc_t (loop tails).
template <typename T>
inline T new_dual(T dual, T grad, T grad_weight) { return dual + grad_weight * grad; }
template <typename T>
inline T prox_input(T initial, T dual, T inv_beta) { return initial - dual * inv_beta; }
template <typename T>
inline T new_weight(T weight, T z, T z_weight, T one_minus_momentum) {
  return weight * one_minus_momentum + z_weight * z;
}

template <typename scalar_t, typename acc_t>
struct Kernel {
  using IO = VecIO<scalar_t, acc_t>;
  using AccIO = VecIO<acc_t, acc_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = IO::kStep;
  static_assert(IO::kStep == AccIO::kStep, "param and state vectors must cover the same span");

  scalar_t* weight;
  const scalar_t* grad;
  const scalar_t* initial;
  acc_t* dual;
  bool* zero_mask;
  acc_t* group_values;  // coupled phases: partials (written) or scales (read), one per group
  acc_t inv_beta, grad_weight, threshold, momentum, one_minus_momentum;
  GroupView view;
  Phase phase;

  Kernel(const TensorJob& job, Phase run_phase)
      : weight(static_cast<scalar_t*>(job.weight)),
        grad(static_cast<const scalar_t*>(job.grad)),
        initial(static_cast<const scalar_t*>(job.initial)),
        dual(static_cast<acc_t*>(job.dual)),
        zero_mask(job.zero_mask),
        group_values(static_cast<acc_t*>(job.group_values)),
        inv_beta(job.scalars.inv_beta),
        grad_weight(job.scalars.grad_weight),
        threshold(job.scalars.threshold),
        momentum(job.scalars.momentum),
        one_minus_momentum(job.scalars.one_minus_momentum),
        view(job.view),
        phase(run_phase) {}

  // Pass 1 at index i: V <- V + s*g (stored), returns z = W0 - V/beta.
  acc_t dual_and_z(int64_t i) const {
    const acc_t updated = new_dual<acc_t>(dual[i], static_cast<acc_t>(grad[i]), grad_weight);
    dual[i] = updated;
    return prox_input<acc_t>(static_cast<acc_t>(initial[i]), updated, inv_beta);
  }
  void dual_and_z(int64_t i, Vec& z_lo, Vec& z_hi) const {
    Vec grad_lo, grad_hi, initial_lo, initial_hi, dual_lo, dual_hi;
    IO::load(grad + i, grad_lo, grad_hi);
    AccIO::load(dual + i, dual_lo, dual_hi);
    const Vec grad_weight_vec(grad_weight);
    dual_lo = new_dual(dual_lo, grad_lo, grad_weight_vec);
    dual_hi = new_dual(dual_hi, grad_hi, grad_weight_vec);
    AccIO::store(dual + i, dual_lo, dual_hi);
    IO::load(initial + i, initial_lo, initial_hi);
    const Vec inv_beta_vec(inv_beta);
    z_lo = prox_input(initial_lo, dual_lo, inv_beta_vec);
    z_hi = prox_input(initial_hi, dual_hi, inv_beta_vec);
  }
  // Pass 2 at index i, V already updated: W <- (1-c) W + z_weight * z.
  void write_weight(int64_t i, acc_t z_weight) const {
    const acc_t z = prox_input<acc_t>(static_cast<acc_t>(initial[i]), dual[i], inv_beta);
    weight[i] = static_cast<scalar_t>(
        new_weight<acc_t>(static_cast<acc_t>(weight[i]), z, z_weight, one_minus_momentum));
  }
  void write_weight(int64_t i, const Vec& z_weight_lo, const Vec& z_weight_hi) const {
    Vec initial_lo, initial_hi, dual_lo, dual_hi, weight_lo, weight_hi;
    IO::load(initial + i, initial_lo, initial_hi);
    AccIO::load(dual + i, dual_lo, dual_hi);
    IO::load(weight + i, weight_lo, weight_hi);
    const Vec inv_beta_vec(inv_beta), one_minus_momentum_vec(one_minus_momentum);
    const Vec z_lo = prox_input(initial_lo, dual_lo, inv_beta_vec);
    const Vec z_hi = prox_input(initial_hi, dual_hi, inv_beta_vec);
    IO::store(weight + i, new_weight(weight_lo, z_lo, z_weight_lo, one_minus_momentum_vec),
              new_weight(weight_hi, z_hi, z_weight_hi, one_minus_momentum_vec));
  }
  void write_weight(int64_t i, const Vec& z_lo, const Vec& z_hi, const Vec& z_weight_lo,
                    const Vec& z_weight_hi) const {
    Vec weight_lo, weight_hi;
    IO::load(weight + i, weight_lo, weight_hi);
    const Vec one_minus_momentum_vec(one_minus_momentum);
    IO::store(weight + i, new_weight(weight_lo, z_lo, z_weight_lo, one_minus_momentum_vec),
              new_weight(weight_hi, z_hi, z_weight_hi, one_minus_momentum_vec));
  }

  // No prox: one pass, W <- (1-c) W + c z.
  void plain(int64_t begin, int64_t end) const {
    int64_t i = begin;
    const Vec momentum_vec(momentum);
    for (; i + kStep <= end; i += kStep) {
      Vec z_lo, z_hi;
      dual_and_z(i, z_lo, z_hi);
      write_weight(i, z_lo, z_hi, momentum_vec, momentum_vec);
    }
    for (; i < end; ++i) {
      const acc_t z = dual_and_z(i);
      weight[i] = static_cast<scalar_t>(
          new_weight<acc_t>(static_cast<acc_t>(weight[i]), z, momentum, one_minus_momentum));
    }
  }

  // Groups of one entry (L1): the group norm is |z|, so one pass does it all.
  acc_t single_z_weight(acc_t z) const {
    const acc_t norm = std::abs(z);
    return norm > threshold ? momentum * ((norm - threshold) / norm) : acc_t(0);
  }
  void elementwise(int64_t begin, int64_t end) const {
    int64_t i = begin;
    const Vec momentum_vec(momentum), threshold_vec(threshold), zero(0);
    acc_t zeroed[kStep];
    for (; i + kStep <= end; i += kStep) {
      Vec z_lo, z_hi;
      dual_and_z(i, z_lo, z_hi);
      const Vec norm_lo = z_lo.abs(), norm_hi = z_hi.abs();
      // (norm - threshold)/norm is NaN where norm == 0; blendv keeps those lanes at 0
      const Vec z_weight_lo = Vec::blendv(
          zero, momentum_vec * ((norm_lo - threshold_vec) / norm_lo), norm_lo > threshold_vec);
      const Vec z_weight_hi = Vec::blendv(
          zero, momentum_vec * ((norm_hi - threshold_vec) / norm_hi), norm_hi > threshold_vec);
      write_weight(i, z_lo, z_hi, z_weight_lo, z_weight_hi);
      // norm <= threshold, not !(norm > threshold): a NaN is never recorded as zero
      norm_lo.le(threshold_vec).store(zeroed);
      norm_hi.le(threshold_vec).store(zeroed + Vec::size());
      for (int64_t k = 0; k < kStep; ++k) zero_mask[i + k] = zeroed[k] != acc_t(0);
    }
    for (; i < end; ++i) {
      const acc_t z = dual_and_z(i);
      zero_mask[i] = std::abs(z) <= threshold;
      weight[i] = static_cast<scalar_t>(new_weight<acc_t>(
          static_cast<acc_t>(weight[i]), z, single_z_weight(z), one_minus_momentum));
    }
  }

  // The group's prox scale folded with c; also records whether the group became 0.
  acc_t group_z_weight(acc_t sum_sq, int64_t group) const {
    const acc_t norm = std::sqrt(sum_sq);
    const bool keep = norm > threshold;
    zero_mask[group] = norm <= threshold;  // a NaN norm is never recorded as zero
    return keep ? momentum * ((norm - threshold) / norm) : acc_t(0);
  }

  // Contiguous groups (view outer == 1): both passes per group, the second from cache.
  void contiguous_groups(int64_t first_group, int64_t last_group, int64_t group_size) const {
    acc_t lanes[Vec::size()];
    for (int64_t group = first_group; group < last_group; ++group) {
      const int64_t begin = group * group_size, end = begin + group_size;
      Vec sum_sq_lo(0), sum_sq_hi(0);
      int64_t i = begin;
      for (; i + kStep <= end; i += kStep) {
        Vec z_lo, z_hi;
        dual_and_z(i, z_lo, z_hi);
        sum_sq_lo = at::vec::fmadd(z_lo, z_lo, sum_sq_lo);
        sum_sq_hi = at::vec::fmadd(z_hi, z_hi, sum_sq_hi);
      }
      (sum_sq_lo + sum_sq_hi).store(lanes);
      acc_t sum_sq = 0;
      for (int64_t k = 0; k < Vec::size(); ++k) sum_sq += lanes[k];
      for (; i < end; ++i) {
        const acc_t z = dual_and_z(i);
        sum_sq += z * z;
      }
      const acc_t z_weight = group_z_weight(sum_sq, group);
      const Vec z_weight_vec(z_weight);
      for (i = begin; i + kStep <= end; i += kStep) write_weight(i, z_weight_vec, z_weight_vec);
      for (; i < end; ++i) write_weight(i, z_weight);
    }
  }

  // Strided groups: the columns [first_column, first_column + width) of the
  // (outer, groups*inner) matrix, rows [row_begin, row_end). Buffers of one entry per column
  // (band width, not tensor size) keep both passes vectorized whatever `inner` is (1 for
  // linear layers, 9 for 3x3 convs).
  void accumulate_rows(acc_t* column_sums, int64_t first_column, int64_t width,
                       int64_t row_begin, int64_t row_end) const {
    for_each_band_row(
        first_column, width, row_begin, row_end,
        [&](int64_t i, int64_t j) {
          Vec z_lo, z_hi, sums_lo, sums_hi;
          dual_and_z(i, z_lo, z_hi);
          AccIO::load(column_sums + j, sums_lo, sums_hi);
          AccIO::store(column_sums + j, at::vec::fmadd(z_lo, z_lo, sums_lo),
                       at::vec::fmadd(z_hi, z_hi, sums_hi));
        },
        [&](int64_t i, int64_t j) {
          const acc_t z = dual_and_z(i);
          column_sums[j] += z * z;
        });
  }
  // The sum of a group's `inner` column sums, in column order.
  acc_t group_sum(const acc_t* group_columns) const {
    acc_t sum_sq = 0;
    for (int64_t k = 0; k < view.inner; ++k) sum_sq += group_columns[k];
    return sum_sq;
  }
  // Turns the column sums of z^2 of groups [first_group, last_group) into each column's
  // z weight, in place.
  void finish_groups(acc_t* columns, int64_t first_group, int64_t last_group) const {
    for (int64_t group = first_group; group < last_group; ++group) {
      acc_t* group_columns = columns + (group - first_group) * view.inner;
      std::fill(group_columns, group_columns + view.inner,
                group_z_weight(group_sum(group_columns), group));
    }
  }
  // rmda_partials_: each group's sum of z^2 from its column sums, into group_values.
  void store_partials(const acc_t* columns, int64_t first_group, int64_t last_group) const {
    for (int64_t group = first_group; group < last_group; ++group) {
      group_values[group] = group_sum(columns + (group - first_group) * view.inner);
    }
  }
  // rmda_apply_: each column's z weight, c times its group's scale (group_values).
  void scale_columns(acc_t* columns, int64_t first_group, int64_t last_group) const {
    for (int64_t group = first_group; group < last_group; ++group) {
      acc_t* group_columns = columns + (group - first_group) * view.inner;
      std::fill(group_columns, group_columns + view.inner, momentum * group_values[group]);
    }
  }
  // Forwards over rows: walking them backwards, to start pass 2 on the rows pass 1 left in
  // cache, measured 25-35% slower (the prefetchers follow forward streams best; see
  // work_plan.cpp).
  void write_rows(const acc_t* column_weights, int64_t first_column, int64_t width,
                  int64_t row_begin, int64_t row_end) const {
    for_each_band_row(
        first_column, width, row_begin, row_end,
        [&](int64_t i, int64_t j) {
          Vec z_weight_lo, z_weight_hi;
          AccIO::load(column_weights + j, z_weight_lo, z_weight_hi);
          write_weight(i, z_weight_lo, z_weight_hi);
        },
        [&](int64_t i, int64_t j) { write_weight(i, column_weights[j]); });
  }

  // Rows [row_begin, row_end) of the band of columns [first_column, first_column + width):
  // vector_op(element, column) on kStep columns at a time, then scalar_op on the row's tail.
  // Both passes of the strided groups walk the band so, with their own per-column work.
  template <typename VectorOp, typename ScalarOp>
  void for_each_band_row(int64_t first_column, int64_t width, int64_t row_begin,
                         int64_t row_end, const VectorOp& vector_op,
                         const ScalarOp& scalar_op) const {
    const int64_t row_length = view.groups * view.inner;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t row_start = row * row_length + first_column;
      int64_t j = 0;
      for (; j + kStep <= width; j += kStep) vector_op(row_start + j, j);
      for (; j < width; ++j) scalar_op(row_start + j, j);
    }
  }

  // A band of whole groups [first_group, last_group) of a strided tensor over all rows, in
  // one thread: the passes of `phase` (the coupled phases treat every tensor so, contiguous
  // groups included: a band of one row).
  void whole_band(int64_t first_group, int64_t last_group) const {
    const int64_t first_column = first_group * view.inner;
    const int64_t width = (last_group - first_group) * view.inner;
    std::vector<acc_t> columns(width, acc_t(0));  // sum of z^2 per column, or z weight
    if (phase == Phase::kApply) {
      scale_columns(columns.data(), first_group, last_group);
    } else {
      accumulate_rows(columns.data(), first_column, width, 0, view.outer);
      if (phase == Phase::kPartials) {
        store_partials(columns.data(), first_group, last_group);
        return;
      }
      finish_groups(columns.data(), first_group, last_group);
    }
    write_rows(columns.data(), first_column, width, 0, view.outer);
  }

  // Row chunk `chunk` of a split band, pass 1: the chunk's own column sums of z^2.
  void chunk_pass1(const SplitBand& band, int64_t chunk) const {
    const int64_t width = (band.last_group - band.first_group) * view.inner;
    acc_t* column_sums = static_cast<acc_t*>(band.column_sums) + chunk * width;
    std::fill(column_sums, column_sums + width, acc_t(0));
    accumulate_rows(column_sums, band.first_group * view.inner, width,
                    chunk * band.rows_per_chunk,
                    std::min(view.outer, (chunk + 1) * band.rows_per_chunk));
  }
  // Sums a split band's chunk partials in chunk order (so the result does not depend on the
  // thread count) into the first chunk's buffer.
  void sum_chunks(const SplitBand& band) const {
    const int64_t width = (band.last_group - band.first_group) * view.inner;
    acc_t* column_sums = static_cast<acc_t*>(band.column_sums);
    for (int64_t chunk = 1; chunk < band.chunks; ++chunk) {
      const acc_t* partial = column_sums + chunk * width;
      int64_t j = 0;
      for (; j + kStep <= width; j += kStep) {
        Vec sums_lo, sums_hi, partial_lo, partial_hi;
        AccIO::load(column_sums + j, sums_lo, sums_hi);
        AccIO::load(partial + j, partial_lo, partial_hi);
        AccIO::store(column_sums + j, sums_lo + partial_lo, sums_hi + partial_hi);
      }
      for (; j < width; ++j) column_sums[j] += partial[j];
    }
  }
  void chunk_pass2(const SplitBand& band, int64_t chunk) const {
    write_rows(static_cast<const acc_t*>(band.column_sums), band.first_group * view.inner,
               (band.last_group - band.first_group) * view.inner, chunk * band.rows_per_chunk,
               std::min(view.outer, (chunk + 1) * band.rows_per_chunk));
  }

  // A split band in the run of `phase`: its pass-1 units (row chunks; for rmda_apply_ one,
  // the column weights), what the last unit to finish does, and whether pass 2 follows.
  int64_t pass1_units(const SplitBand& band) const {
    return phase == Phase::kApply ? 1 : band.chunks;
  }
  void band_pass1(const SplitBand& band, int64_t unit) const {
    if (phase == Phase::kApply) {
      scale_columns(static_cast<acc_t*>(band.column_sums), band.first_group, band.last_group);
    } else {
      chunk_pass1(band, unit);
    }
  }
  void finish_band(const SplitBand& band) const {
    if (phase == Phase::kApply) return;
    sum_chunks(band);
    acc_t* column_sums = static_cast<acc_t*>(band.column_sums);
    if (phase == Phase::kPartials) {
      store_partials(column_sums, band.first_group, band.last_group);
    } else {
      finish_groups(column_sums, band.first_group, band.last_group);
    }
  }
  bool has_pass2() const { return phase != Phase::kPartials; }

  void run(const WorkItem& item) const {
    if (phase == Phase::kPlainStep) {
      plain(item.begin, item.end);
    } else if (phase != Phase::kProxStep || view.outer != 1) {
      whole_band(item.begin, item.end);
    } else if (view.group_size() == 1) {
      elementwise(item.begin, item.end);
    } else {
      contiguous_groups(item.begin, item.end, view.inner);
    }
  }
};

// t <- t + 1, A <- A + s (s = lr * sqrt(t)), then the scalars of this step's elements, in
// acc_t as the reference backend computes them. (rmda_partials_ uses inv_beta and
// grad_weight only.)
template <typename acc_t>
StepScalars advance_scalars(const at::Tensor& step, const at::Tensor& alpha, double lr,
                            const std::optional<double>& grad_scale, double momentum, double lam,
                            int64_t group_size) {
  acc_t* t = step.data_ptr<acc_t>();
  acc_t* alpha_sum = alpha.data_ptr<acc_t>();
  *t = *t + acc_t(1);
  const acc_t beta = std::sqrt(*t);
  const acc_t step_size = beta * static_cast<acc_t>(lr);
  *alpha_sum = *alpha_sum + step_size;
  const acc_t grad_weight =
      grad_scale ? step_size / static_cast<acc_t>(*grad_scale) : step_size;
  const acc_t tau = (*alpha_sum / beta) * static_cast<acc_t>(lam);
  const acc_t threshold =
      tau * static_cast<acc_t>(std::sqrt(static_cast<double>(group_size)));
  // z = W0 - V * (1/beta): a multiply instead of a divide per element (within an ulp of
  // the reference's V / beta); at ~40 GB/s per core the divide is not free.
  return StepScalars{acc_t(1) / beta, grad_weight, threshold, static_cast<acc_t>(momentum),
                     static_cast<acc_t>(1.0 - momentum)};
}

// The scalars of rmda_apply_'s pass: beta from the t that rmda_partials_ advanced (so z is
// the same bits in both phases); it moves no state, reads no gradient and has no threshold
// (the scales carry the prox).
template <typename acc_t>
StepScalars apply_scalars(const at::Tensor& step, double momentum) {
  const acc_t beta = std::sqrt(*step.data_ptr<acc_t>());
  return StepScalars{acc_t(1) / beta, 0.0, 0.0, static_cast<acc_t>(momentum),
                     static_cast<acc_t>(1.0 - momentum)};
}

// What a CPU op reads of its scalar arguments (reading them on CPU costs nothing).
struct HostScalars {
  bool skip;  // found_inf is nonzero: the op changes nothing, not even t
  double lr;
  std::optional<double> grad_scale;
};
inline HostScalars read_host_scalars(double lr, const std::optional<at::Tensor>& lr_tensor,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf) {
  HostScalars host{found_inf && found_inf->item<double>() != 0.0, lr, std::nullopt};
  if (lr_tensor) host.lr = lr_tensor->item<double>();
  if (grad_scale) host.grad_scale = grad_scale->item<double>();
  return host;
}

}  // namespace rmda_fused::cpu
