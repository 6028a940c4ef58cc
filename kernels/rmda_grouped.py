"""RMDA step with group LASSO over the (outer, groups, inner) view: input_channel and
output_channel, for conv (O, I, k...), pointwise (O, I, 1, 1) and linear (O, I) alike.

One launch per dtype bucket, one DRAM pass. A task is a band of consecutive groups of one
tensor with ALL their rows: for each outer index o the band is one contiguous run of
``n_groups * inner`` entries, so its loads are coalesced along the run. A tile is
BLOCK_R x BLOCK_L: a tile row holds BLOCK_L // run runs of consecutive outer indices side
by side (short input_channel runs fill the lanes), or, for a run longer than BLOCK_L, one
BLOCK_L piece of it. The group norm is a reduction over the tile rows, then of the columns
into groups (one norm per group, in fp32/fp64, in a fixed order: no atomics, the same bits
whichever program runs when), broadcast back so every element of a group sees the same
scale and the same zero test.

- A band that fits one tile keeps z in registers: one walk (read g, W, W0, V; write W, V).
- A larger band is walked twice by its program: walk 1 reads g, V, W0, writes V and sums
  z^2; walk 2 re-reads V and W0, reads W, writes W. The re-read is served by the L2 when
  every resident program's band fits it at once, which is how bands are sized (the L2
  model below); a group larger than that budget gets a band of its own and may re-read
  V and W0 from DRAM (benchmarks/traffic.py counts which).

The grid is at most PROGRAMS programs; program p takes tasks p, p + grid, ... so that at
most PROGRAMS bands are in flight whatever the occupancy. Every task derives its tensor's
scalars from the old t and A; the last task of a tensor to arrive writes the new ones
(rmda_scalars.tensor_step_scalars).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_D1, COL_D2, COL_D3, COL_MASK, NCOL, VECTOR, LRUCache,
    cached_meta_and_counters, div_exact, element_pointers, emulate_bf16_rtne, kernel_dtypes,
    momentum_weights, pointers_aligned, round_to, sqrt_exact, to_device,
)
from .rmda_scalars import amp_pointers, tensor_step_scalars

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

# (BLOCK_R, BLOCK_L, BLOCK_G) per grouping: input_channel runs are short (n_groups * k*k,
# several side by side in a tile row) and the rows many (O); output_channel has one row
# (outer = 1) whose run is long (I * k*k: a one-group band longer than BLOCK_L is cut into
# pieces, a tile row each). BLOCK_G, the most groups per band, bounds the column-to-group
# reduction.
TILES = {"input_channel": (64, 32, 32), "output_channel": (16, 128, 8)}

# The L2 model that sizes bands (H100 SXM and H200: 132 SMs, 50 MB of L2). Between a band's
# two walks every other band in flight moves through the L2 too; each holds V and W0 (to
# be re-read) and W (walk 2's lines), so the re-read hits when
#     PROGRAMS x band elements x (bytes of V + W0 + W per element) <= L2_SHARE x L2_BYTES,
# half of the L2 leaving room for g's streaming lines, the tables and imperfect LRU.
# PROGRAMS caps the grid (two programs of 8 warps per SM: the fp32 variants compile to
# 80-120 registers per thread, tests/kernels/test_compile.py), so it bounds the bands in
# flight even where more programs would fit an SM.
L2_BYTES = 50e6
L2_SHARE = 0.5
SMS = 132
PROGRAMS = 2 * SMS

# the shape words of this family's meta rows: the group view, and the tensor's task count
COL_OUTER, COL_GROUPS, COL_INNER, COL_ARRIVALS = COL_D0, COL_D1, COL_D2, COL_D3

# columns of the task table (int64): the tensor, its band's first group and group count
TASK_TENSOR, TASK_FIRST_GROUP, TASK_N_GROUPS = map(tl.constexpr, range(3))
TCOL = tl.constexpr(4)  # one spare column keeps rows 32 bytes apart


def band_footprint(param: int, initial: int, dual: int) -> int:
    """Bytes per element a band holds in the L2 between its walks (V, W0 and W)."""
    return dual + initial + param


def band_budget(footprint: int, l2_bytes: float = L2_BYTES) -> int:
    """The most elements of a band whose second walk the L2 model serves."""
    return int(L2_SHARE * l2_bytes // (PROGRAMS * footprint))


def band_groups(outer: int, inner: int, block_l: int, block_g: int, budget: int) -> int:
    """Groups per band: as many as a tile row's run holds (longest runs: fewest sectors
    per element), at most BLOCK_G, and no more than the L2 budget allows (at least one)."""
    if inner == 0:
        return block_g
    return max(1, min(block_g, block_l // inner, budget // max(outer * inner, 1)))


def band_layout(outer: int, inner: int, n_groups: int, block_l: int):
    """(run, segment, pieces per run, segments per tile row, tile rows) of a band, as the
    kernel's _band_layout computes them."""
    run = n_groups * inner
    segment = max(min(run, block_l), 1)
    pieces = max(triton.cdiv(run, segment), 1)
    per_row = block_l // segment
    return run, segment, pieces, per_row, triton.cdiv(outer * pieces, per_row)


def plan(views, block_l: int, block_g: int, budget: int):
    """Per-tensor shape words and the task table: a band per task, at least one task per
    tensor (an empty one still advances t and A)."""
    dims, tasks = [], []
    for tensor, (outer, groups, inner) in enumerate(views):
        width = band_groups(outer, inner, block_l, block_g, budget)
        firsts = range(0, groups, width) or range(1)
        dims.append((outer, groups, inner, len(firsts)))
        tasks += [(tensor, first, min(width, groups - first), 0) for first in firsts]
    return dims, tasks


def runs_aligned(views, tasks) -> bool:
    """Whether every band's runs start, end and repeat (the row stride) on multiples of
    VECTOR elements."""
    return all((n * inner) % VECTOR.value == 0 and (first * inner) % VECTOR.value == 0
               and (groups * inner) % VECTOR.value == 0
               for (_, groups, inner), (_, first, n, _) in
               ((views[task[0]], task) for task in tasks))


@triton.jit
def _band_layout(outer, inner, n_groups, BLOCK_L: tl.constexpr):
    run = n_groups * inner
    segment = tl.maximum(tl.minimum(run, BLOCK_L), 1)
    pieces = tl.maximum(tl.cdiv(run, segment), 1)
    per_row = BLOCK_L // segment
    return run, segment, pieces, per_row, tl.cdiv(outer * pieces, per_row)


@triton.jit
def _band_columns(cols, group_ids, segment, per_row, inner):
    """Per tile column: its segment (which run of the tile row), its place in the run, and
    whether it holds one; and [BLOCK_G, BLOCK_L] which group each column belongs to. (A run
    in pieces is one group's, whose place in the run is the piece's offset plus this.)"""
    in_segment = cols % segment
    used = cols < per_row * segment
    in_group = ((in_segment // tl.maximum(inner, 1))[None, :] == group_ids[:, None]) \
        & used[None, :]
    return cols // segment, in_segment, used, in_group


@triton.jit
def _band_tile(tile_rows, columns, layout, pointers, ALIGNED: tl.constexpr):
    """(W, g, W0, V) pointers at the band's tile rows ``tile_rows`` and their in-bounds
    mask; with ALIGNED (runs, strides and offsets multiples of VECTOR on 16-byte arrays)
    known to hold aligned runs of VECTOR columns, under a mask constant over them."""
    col_segment, in_segment, used = columns
    outer_live, stride, group_offset, run, segment, pieces, per_row = layout
    o = (tile_rows // pieces)[:, None] * per_row + col_segment[None, :]
    pos = ((tile_rows % pieces) * segment)[:, None] + in_segment[None, :]
    offs = o * stride + group_offset + pos
    m = (o < outer_live) & used[None, :] & (pos < run)
    p, g, w0, v = pointers[0] + offs, pointers[1] + offs, pointers[2] + offs, pointers[3] + offs
    if ALIGNED:
        m = tl.max_constancy(m, [1, VECTOR])
        p = tl.max_contiguous(tl.multiple_of(p, [1, 16]), [1, VECTOR])
        g = tl.max_contiguous(tl.multiple_of(g, [1, 16]), [1, VECTOR])
        w0 = tl.max_contiguous(tl.multiple_of(w0, [1, 16]), [1, VECTOR])
        v = tl.max_contiguous(tl.multiple_of(v, [1, 16]), [1, VECTOR])
    return p, g, w0, v, m


@triton.jit
def _group_scale(group_sumsq, threshold, FP64: tl.constexpr):
    """Per group: the factor max(||z|| - threshold, 0) / ||z|| of the group soft-threshold,
    and whether the group ends zero."""
    norm = sqrt_exact(group_sumsq, FP64)
    keep = norm > threshold  # norm == 0 is never kept: the division never selects 0/0
    den = tl.where(keep, norm, 1.0)
    scale = tl.where(keep, div_exact(norm - threshold, den, FP64), 0.0)
    return scale, norm <= threshold  # a NaN norm is never recorded as zero


@triton.jit
def _new_dual(v_ptrs, g_ptrs, m, grad_weight, F: tl.constexpr):
    """V + (s / grad_scale) * g (not stored)."""
    v = tl.load(v_ptrs, mask=m, other=0.0)
    return v + grad_weight * tl.load(g_ptrs, mask=m, other=0.0).to(F)


@triton.jit
def _prox_input(w0_ptrs, v, m, beta, F: tl.constexpr, FP64: tl.constexpr):
    """z = W0 - V / beta, before the prox."""
    w0 = tl.load(w0_ptrs, mask=m, other=0.0).to(F)
    return w0 - div_exact(v, beta, FP64)


@triton.jit
def _columns_to_groups(in_group, per_column):
    return tl.sum(tl.where(in_group, per_column[None, :], 0.0), axis=1)


@triton.jit
def _groups_to_columns(in_group, per_group):
    return tl.sum(tl.where(in_group, per_group[:, None], 0.0), axis=0)


@triton.jit
def _write_weight(p_ptrs, m, z, col_scale, c, one_minus_c, P: tl.constexpr, F: tl.constexpr,
                  RTNE: tl.constexpr):
    """W <- (1 - c) W + c * prox(z), the prox being z times its group's scale."""
    w = one_minus_c * tl.load(p_ptrs, mask=m, other=0.0).to(F) + c * (z * col_scale[None, :])
    tl.store(p_ptrs, round_to(w, P, RTNE), mask=m)


@triton.jit
def _band_step(meta, task, counters, hyper, lr_ptr, scale_ptr, inf_ptr,
               P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr,
               FP64: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_INF: tl.constexpr, RTNE: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr):
    tensor = tl.load(task + TASK_TENSOR)
    first_group = tl.load(task + TASK_FIRST_GROUP)
    n_groups = tl.load(task + TASK_N_GROUPS)
    tensor_row = meta + tensor * NCOL
    outer = tl.load(tensor_row + COL_OUTER)
    groups = tl.load(tensor_row + COL_GROUPS)
    inner = tl.load(tensor_row + COL_INNER)
    beta, grad_weight, tau, live = tensor_step_scalars(
        tensor_row, tensor, tl.load(tensor_row + COL_ARRIVALS), counters, hyper, lr_ptr,
        scale_ptr, inf_ptr, F, FP64, HAS_LR_TENSOR, HAS_SCALE, HAS_INF)
    # tau * sqrt(|G|) rounded on its own as in the reference: next to ``norm - threshold``
    # the compiler would fuse the product and the difference into one fma
    threshold = tau * sqrt_exact((outer * inner).to(F), FP64)
    run, segment, pieces, per_row, n_tile_rows = _band_layout(outer, inner, n_groups, BLOCK_L)
    # a skipped step (found_inf) has no rows and writes no mask entry: nothing changes
    layout = (tl.where(live, outer, 0), groups * inner, first_group * inner, run, segment,
              pieces, per_row)
    group_ids = tl.arange(0, BLOCK_G)
    col_segment, in_segment, used, in_group = _band_columns(
        tl.arange(0, BLOCK_L), group_ids, segment, per_row, inner)
    columns = (col_segment, in_segment, used)
    tile_rows = tl.arange(0, BLOCK_R).to(tl.int64)
    pointers = element_pointers(tensor_row, P, G, I, F)
    c, one_minus_c = momentum_weights(hyper, F)
    if n_tile_rows <= BLOCK_R:  # one tile: z stays in registers, one walk
        p, g, w0, v_ptrs, m = _band_tile(tile_rows, columns, layout, pointers, ALIGNED)
        v = _new_dual(v_ptrs, g, m, grad_weight, F)
        z = _prox_input(w0, v, m, beta, F, FP64)
        scale, zero = _group_scale(_columns_to_groups(in_group, tl.sum(z * z, axis=0)),
                                   threshold, FP64)
        tl.store(v_ptrs, v, mask=m)
        _write_weight(p, m, z, _groups_to_columns(in_group, scale), c, one_minus_c, P, F, RTNE)
    else:  # walk 1: V and the sums of z^2; walk 2: re-read V, W0 (from L2) and write W
        col_sumsq = tl.zeros([BLOCK_L], F)
        for first_row in range(0, n_tile_rows, BLOCK_R):
            p, g, w0, v_ptrs, m = _band_tile(first_row + tile_rows, columns, layout, pointers,
                                             ALIGNED)
            v = _new_dual(v_ptrs, g, m, grad_weight, F)
            z = _prox_input(w0, v, m, beta, F, FP64)
            tl.store(v_ptrs, v, mask=m)
            col_sumsq += tl.sum(z * z, axis=0)
        scale, zero = _group_scale(_columns_to_groups(in_group, col_sumsq), threshold, FP64)
        col_scale = _groups_to_columns(in_group, scale)
        for first_row in range(0, n_tile_rows, BLOCK_R):  # each lane re-reads what it wrote
            p, g, w0, v_ptrs, m = _band_tile(first_row + tile_rows, columns, layout, pointers,
                                             ALIGNED)
            z = _prox_input(w0, tl.load(v_ptrs, mask=m, other=0.0), m, beta, F, FP64)
            _write_weight(p, m, z, col_scale, c, one_minus_c, P, F, RTNE)
    mask_ptr = tl.load(tensor_row + COL_MASK).to(tl.pointer_type(tl.int8))
    tl.store(mask_ptr + first_group + group_ids, zero.to(tl.int8),
             mask=group_ids < tl.where(live, n_groups, 0))


@triton.jit(do_not_specialize=["n_tasks"])
def _rmda_grouped_kernel(
    meta, tasks, n_tasks, counters, hyper, lr_ptr, scale_ptr, inf_ptr,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    RTNE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    for task in range(tl.program_id(0), n_tasks, tl.num_programs(0)):
        _band_step(meta, tasks + task * TCOL, counters, hyper, lr_ptr,
                   scale_ptr, inf_ptr, P, G, I, F, FP64, HAS_LR_TENSOR, HAS_SCALE, HAS_INF,
                   RTNE, ALIGNED, BLOCK_R, BLOCK_L, BLOCK_G)


def bucket_band_budget(batch: StepBatch, l2_bytes: float = L2_BYTES) -> int:
    """:func:`band_budget` for a one-bucket batch's dtypes."""
    return band_budget(band_footprint(batch.params[0].element_size(),
                                      batch.initials[0].element_size(),
                                      batch.duals[0].element_size()), l2_bytes)


_PLAN_CACHE = LRUCache(64)


def rmda_grouped_step_(
    batch: StepBatch, *, grouping: str, hyper: torch.Tensor, lr: torch.Tensor | None,
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    tile: tuple[int, int, int] | None = None, num_warps: int = 8,
) -> int:
    """One RMDA step with channel group LASSO for a one-bucket batch (one device, one dtype
    per list, contiguous tensors, the group views of rmda_fused.grouping): one launch.

    ``tile`` overrides (BLOCK_R, BLOCK_L, BLOCK_G) (tests use tiny tiles to exercise the
    two-walk bands on small shapes). Returns the number of launches.
    """
    if not len(batch):
        return 0
    device = batch.params[0].device
    block_r, block_l, block_g = tile or TILES[grouping]
    budget = bucket_band_budget(batch)
    views = tuple(tuple(v) for v in batch.views)

    def build():
        dims, tasks = plan(views, block_l, block_g, budget)
        return dims, len(tasks), to_device(tasks, device), runs_aligned(views, tasks)

    dims, n_tasks, tasks, runs_ok = _PLAN_CACHE.get(
        (str(device), views, block_l, block_g, budget), build)
    meta, counters = cached_meta_and_counters("grouped", batch, dims, device)
    pointers, has = amp_pointers(hyper, lr, grad_scale, found_inf)
    _rmda_grouped_kernel[(min(n_tasks, PROGRAMS),)](
        meta, tasks, n_tasks, counters, hyper, *pointers, **kernel_dtypes(batch), **has,
        RTNE=emulate_bf16_rtne(batch.params[0].dtype),
        ALIGNED=runs_ok and pointers_aligned(batch), BLOCK_R=block_r, BLOCK_L=block_l,
        BLOCK_G=block_g, num_warps=num_warps)
    return 1
