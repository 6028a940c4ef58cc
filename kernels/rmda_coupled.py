"""The two kernel phases of a coupled-group step (grouping ``coupled``): "partials" and
"apply" of "partials -> reduce -> apply" (the reduce between them is torch code shared by
every backend, rmda_fused.coupled).

A coupled group spans columns of several tensors, so no kernel sees a whole group: the
partials phase sums z^2 per input-channel group (column) of each tensor, the reduce adds
the columns of each coupled group and turns norms into per-column scales, and the apply
phase scales z. Both kernels walk each tensor's input_channel memory view
(outer, groups, inner) in bands of consecutive groups: for each outer index a band's
entries are one contiguous run of ``n_groups * inner`` (one band row), so loads are
coalesced along the run. A run longer than BLOCK_L (inner > BLOCK_L, e.g. 7x7 taps) is
folded into several band rows.

- partials: V <- V + (s / grad_scale) g (stored), z = W0 - V / beta, and per group the sum
  of z^2 over the band's rows. A band of at most CHUNK_ROWS rows is one program, which
  writes its sums straight into the caller's partials tensor; a taller band is split into
  row chunks over several programs that write per-chunk sums to scratch slots, added in
  slot order by a tiny reduce launch (deterministic, no float atomics).
- apply: W <- (1 - c) W + c (scale_k z) with beta = sqrt(t) of the already advanced t,
  computed in the state dtype and rounded once to the parameter dtype. It reads beta from
  t itself, not from the partials' scratch, so another group's partials launched in
  between cannot change it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_D1, COL_D2, COL_D3, COL_G, COL_P, COL_STEP, COL_V, COL_W0, NCOL, NSCR,
    SCR_BETA, SCR_GRAD_WEIGHT, SCR_SKIP, LRUCache, cached_meta, div_exact, emulate_bf16_rtne,
    kernel_dtypes, momentum_weights, round_to, sqrt_exact, to_device,
)
from .rmda_scalars import rmda_scalars_

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

# (BLOCK_R, BLOCK_L, BLOCK_G): input_channel runs are short (n_groups * k*k) and the rows
# many (O); BLOCK_G, the most groups per band, bounds the column-to-group reduction
TILE = (64, 32, 32)
CHUNK_ITERS = 2  # a program covers at most CHUNK_ITERS * BLOCK_R band rows

# the shape words of this family's meta rows: the group view and the groups per band
COL_OUTER, COL_GROUPS, COL_INNER, COL_BAND_GROUPS = COL_D0, COL_D1, COL_D2, COL_D3

# columns of the band table (int64), one row per program of both kernels: the tensor, the
# band's first group, the band rows [begin, end) of the program, and its scratch slot
# (-1: the program covers the whole band and writes the partials itself)
BAND_TENSOR, BAND_FIRST_GROUP, BAND_ROW_BEGIN, BAND_ROW_END, BAND_SLOT = map(
    tl.constexpr, range(5))
BCOL = tl.constexpr(8)  # three spare columns keep rows 64 bytes apart
# columns of the reduce table (int64), one row per band split over several programs
RED_TENSOR, RED_FIRST_GROUP, RED_FIRST_SLOT, RED_N_SLOTS = map(tl.constexpr, range(4))
RCOL = tl.constexpr(4)


@triton.jit
def _locate_band(bands, meta):
    """This program's row of the band table, its tensor and that tensor's meta row."""
    band = bands + tl.program_id(0).to(tl.int64) * BCOL
    tensor = tl.load(band + BAND_TENSOR)
    return band, tensor, meta + tensor * NCOL


@triton.jit
def _band_groups(tensor_row, first_group):
    """How many groups the band that starts at ``first_group`` holds (the last is short)."""
    return tl.minimum(tl.load(tensor_row + COL_BAND_GROUPS),
                      tl.load(tensor_row + COL_GROUPS) - first_group)


@triton.jit
def _band_layout(band, tensor_row, BLOCK_L: tl.constexpr):
    """(first group, layout) of the program's band; ``layout`` = (offset of the first group
    in an outer index, elements between outer indices, run length, band rows per outer
    index, inner or 1) is what _band_offsets and _band_columns read."""
    first_group = tl.load(band + BAND_FIRST_GROUP)
    groups = tl.load(tensor_row + COL_GROUPS)
    inner = tl.load(tensor_row + COL_INNER)
    run = _band_groups(tensor_row, first_group) * inner
    rows_per_outer = tl.maximum(tl.cdiv(run, BLOCK_L), 1)
    # inner == 0 (a tensor with an empty kernel dim) never divides by zero
    return first_group, (first_group * inner, groups * inner, run, rows_per_outer,
                         tl.maximum(inner, 1))


@triton.jit
def _band_offsets(rows, cols, layout, row_end, BLOCK_L: tl.constexpr):
    """Element offsets of band rows ``rows`` and their in-bounds mask: band row r is chunk
    (r % rows_per_outer) of outer index (r // rows_per_outer)'s run."""
    group_offset, outer_stride, run, rows_per_outer = layout[0], layout[1], layout[2], layout[3]
    pos = ((rows % rows_per_outer) * BLOCK_L)[:, None] + cols[None, :]
    offs = ((rows // rows_per_outer) * outer_stride + group_offset)[:, None] + pos
    return offs, (rows < row_end)[:, None] & (pos < run)


@triton.jit
def _band_columns(cols, layout):
    """Per column of a band row: its group within the band, and whether it is in the run
    (a folded run fills every column, all of group 0)."""
    return cols // layout[4], cols < layout[2]


@triton.jit
def _pre_prox(w0_ptr, v, offs, m, beta, F: tl.constexpr, FP64: tl.constexpr):
    """z = W0 - V / beta at ``offs``."""
    return tl.load(w0_ptr + offs, mask=m, other=0.0).to(F) - div_exact(v, beta, FP64)


@triton.jit
def _rmda_partials_kernel(
    meta, bands, targets, scratch, chunk_sums,
    G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    band, tensor, tensor_row = _locate_band(bands, meta)
    first_group, layout = _band_layout(band, tensor_row, BLOCK_L)
    scratch_row = scratch + tensor * NSCR
    skip = tl.load(scratch_row + SCR_SKIP) != 0.0  # found_inf: V and partials untouched
    row_begin = tl.load(band + BAND_ROW_BEGIN)
    row_end = tl.where(skip, row_begin, tl.load(band + BAND_ROW_END))
    g_ptr = tl.load(tensor_row + COL_G).to(tl.pointer_type(G))
    w0_ptr = tl.load(tensor_row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(tensor_row + COL_V).to(tl.pointer_type(F))
    beta = tl.load(scratch_row + SCR_BETA)
    grad_weight = tl.load(scratch_row + SCR_GRAD_WEIGHT)
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_L)
    col_sumsq = tl.zeros([BLOCK_L], F)
    for r in range(row_begin, row_end, BLOCK_R):
        offs, m = _band_offsets(r + rows, cols, layout, row_end, BLOCK_L)
        v = tl.load(v_ptr + offs, mask=m, other=0.0)
        v = v + grad_weight * tl.load(g_ptr + offs, mask=m, other=0.0).to(F)
        z = _pre_prox(w0_ptr, v, offs, m, beta, F, FP64)
        tl.store(v_ptr + offs, v, mask=m)
        col_sumsq += tl.sum(z * z, axis=0)
    col_group, in_run = _band_columns(cols, layout)
    group_ids = tl.arange(0, BLOCK_G)
    in_group = (col_group[None, :] == group_ids[:, None]) & in_run[None, :]
    group_sumsq = tl.sum(tl.where(in_group, col_sumsq[None, :], 0.0), axis=1)
    n_groups = tl.where(skip, 0, _band_groups(tensor_row, first_group))
    slot = tl.load(band + BAND_SLOT)
    if slot < 0:
        dest = tl.load(targets + tensor).to(tl.pointer_type(F)) + first_group
    else:
        dest = chunk_sums + slot * BLOCK_G
    tl.store(dest + group_ids, group_sumsq, mask=group_ids < n_groups)


@triton.jit
def _rmda_partials_reduce_kernel(
    meta, reduces, targets, scratch, chunk_sums, F: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = reduces + tl.program_id(0).to(tl.int64) * RCOL
    tensor = tl.load(row + RED_TENSOR)
    first_group = tl.load(row + RED_FIRST_GROUP)
    first_slot = tl.load(row + RED_FIRST_SLOT)
    tensor_row = meta + tensor * NCOL
    skip = tl.load(scratch + tensor * NSCR + SCR_SKIP) != 0.0
    n_groups = tl.where(skip, 0, _band_groups(tensor_row, first_group))
    group_ids = tl.arange(0, BLOCK_G)
    valid = group_ids < n_groups
    total = tl.zeros([BLOCK_G], F)
    for k in range(0, tl.load(row + RED_N_SLOTS)):  # slot order: the same sum every step
        total += tl.load(chunk_sums + (first_slot + k) * BLOCK_G + group_ids, mask=valid,
                         other=0.0)
    dest = tl.load(targets + tensor).to(tl.pointer_type(F)) + first_group
    tl.store(dest + group_ids, total, mask=valid)


@triton.jit
def _rmda_apply_kernel(
    meta, bands, targets, hyper, inf_ptr,
    P: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    HAS_INF: tl.constexpr, RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    band, tensor, tensor_row = _locate_band(bands, meta)
    first_group, layout = _band_layout(band, tensor_row, BLOCK_L)
    row_begin = tl.load(band + BAND_ROW_BEGIN)
    row_end = tl.load(band + BAND_ROW_END)
    if HAS_INF:  # a skipped step masks every load and store: W unchanged
        row_end = tl.where(tl.load(inf_ptr) != 0, row_begin, row_end)
    p_ptr = tl.load(tensor_row + COL_P).to(tl.pointer_type(P))
    w0_ptr = tl.load(tensor_row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(tensor_row + COL_V).to(tl.pointer_type(F))
    t_ptr = tl.load(tensor_row + COL_STEP).to(tl.pointer_type(F))
    beta = sqrt_exact(tl.load(t_ptr), FP64)  # what the scalars kernel computed from it
    scales_ptr = tl.load(targets + tensor).to(tl.pointer_type(F)) + first_group
    cols = tl.arange(0, BLOCK_L)
    col_group, in_run = _band_columns(cols, layout)
    col_scale = tl.load(scales_ptr + col_group, mask=in_run & (row_begin < row_end),
                        other=0.0)
    c, one_minus_c = momentum_weights(hyper, F)
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    for r in range(row_begin, row_end, BLOCK_R):
        offs, m = _band_offsets(r + rows, cols, layout, row_end, BLOCK_L)
        z = _pre_prox(w0_ptr, tl.load(v_ptr + offs, mask=m, other=0.0), offs, m, beta, F,
                      FP64)
        w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
        w = one_minus_c * w + c * (z * col_scale[None, :])
        tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)


class _LaunchPlan(NamedTuple):
    dims: list[tuple[int, int, int, int]]  # the meta rows' shape words
    n_bands: int
    n_reduces: int
    bands: torch.Tensor  # the band table, on the device
    reduces: torch.Tensor  # the reduce table, on the device
    scalars: torch.Tensor  # [n_tensors, NSCR]: what rmda_scalars_ writes
    chunk_sums: torch.Tensor  # [slots, BLOCK_G]: the per-chunk sums of split bands


def plan(views: Sequence[tuple[int, int, int]], block_r: int, block_l: int, block_g: int):
    """(shape words, band table rows, reduce table rows, number of scratch slots)."""
    dims, bands, reduces = [], [], []
    slots = 0
    chunk_rows = CHUNK_ITERS * block_r
    for tensor, (outer, groups, inner) in enumerate(views):
        band_groups = block_g if inner == 0 else max(1, min(block_g, block_l // inner))
        dims.append((outer, groups, inner, band_groups))
        for first_group in range(0, groups, band_groups):
            run = min(band_groups, groups - first_group) * inner
            n_rows = outer * max(1, triton.cdiv(run, block_l))
            if n_rows <= chunk_rows:
                bands.append((tensor, first_group, 0, n_rows, -1, 0, 0, 0))
                continue
            starts = range(0, n_rows, chunk_rows)
            reduces.append((tensor, first_group, slots, len(starts)))
            bands.extend((tensor, first_group, row, min(row + chunk_rows, n_rows), slots + k,
                          0, 0, 0) for k, row in enumerate(starts))
            slots += len(starts)
    return dims, bands, reduces, slots


_PLAN_CACHE = LRUCache(64)
_TARGET_CACHE = LRUCache(64)


def _launch_plan(batch: StepBatch, tile: tuple[int, int, int]) -> _LaunchPlan:
    device, state = batch.params[0].device, batch.duals[0].dtype
    views = tuple(tuple(v) for v in batch.views)

    def build():
        dims, bands, reduces, slots = plan(views, *tile)
        return _LaunchPlan(dims, len(bands), len(reduces), to_device(bands, device),
                           to_device(reduces, device),
                           torch.empty(len(batch), NSCR.value, dtype=state, device=device),
                           torch.empty(max(slots, 1) * tile[2], dtype=state, device=device))

    return _PLAN_CACHE.get((str(device), views, tile, state), build)


def _targets(batch: StepBatch, tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """int64 [n_tensors]: the data pointers of the per-tensor partials or scales, checked
    (a kernel would write past a short one) when the table is built."""
    device, state = batch.params[0].device, batch.duals[0].dtype

    def build():
        if len(tensors) != len(batch):
            raise ValueError(f"{what}: {len(tensors)} tensors for {len(batch)} parameters")
        for i, (x, view) in enumerate(zip(tensors, batch.views)):
            if (x.dtype != state or x.device != device or x.dim() != 1
                    or x.numel() != view[1] or not x.is_contiguous()):
                raise ValueError(
                    f"{what}[{i}]: expected a contiguous 1-D {state} tensor of {view[1]} "
                    f"entries on {device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        return to_device([x.data_ptr() for x in tensors], device)

    key = (str(device), state, tuple(batch.views),
           tuple((x.data_ptr(), x.dtype, x.device, tuple(x.shape), x.stride())
                 for x in tensors))
    return _TARGET_CACHE.get(key, build)


def rmda_partials_step_(
    batch: StepBatch, *, hyper: torch.Tensor, lr: torch.Tensor | None,
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    partials: Sequence[torch.Tensor], tile: tuple[int, int, int] | None = None,
    num_warps: int = 8,
) -> int:
    """Phase 1 of a coupled step for a one-bucket batch (one device, one dtype per list,
    dense tensors walked through ``batch.views``, their input_channel memory views): t, A
    and V advanced, and ``partials[i][k]`` = the sum of z^2 over group k of tensor i
    (state dtype). With ``found_inf`` nonzero nothing changes.

    ``tile`` overrides (BLOCK_R, BLOCK_L, BLOCK_G) (tests use tiny tiles to fold runs and
    split bands on small shapes). Returns the number of launches.
    """
    if not len(batch):
        return 0
    tile = tile or TILE
    device = batch.params[0].device
    launch_plan = _launch_plan(batch, tile)
    meta = cached_meta("coupled", batch, launch_plan.dims, device)
    targets = _targets(batch, partials, "partials")
    rmda_scalars_(meta, launch_plan.scalars, len(batch), hyper, lr, grad_scale, found_inf)
    if launch_plan.n_bands == 0:
        return 1
    dtypes = kernel_dtypes(batch)
    del dtypes["P"]  # the partials never read W
    _rmda_partials_kernel[(launch_plan.n_bands,)](
        meta, launch_plan.bands, targets, launch_plan.scalars, launch_plan.chunk_sums,
        **dtypes, BLOCK_R=tile[0], BLOCK_L=tile[1], BLOCK_G=tile[2], num_warps=num_warps)
    if launch_plan.n_reduces == 0:
        return 2
    _rmda_partials_reduce_kernel[(launch_plan.n_reduces,)](
        meta, launch_plan.reduces, targets, launch_plan.scalars, launch_plan.chunk_sums,
        F=dtypes["F"], BLOCK_G=tile[2], num_warps=1)
    return 3


def rmda_apply_step_(
    batch: StepBatch, *, hyper: torch.Tensor, found_inf: torch.Tensor | None,
    scales: Sequence[torch.Tensor], tile: tuple[int, int, int] | None = None,
    num_warps: int = 8,
) -> int:
    """Phase 3 of a coupled step, after rmda_partials_step_ on the same batch:
    W <- (1 - c) W + c (scales[i][k] z) over group k of tensor i, z = W0 - V / sqrt(t).
    With ``found_inf`` nonzero nothing changes. Returns the number of launches."""
    if not len(batch):
        return 0
    tile = tile or TILE
    device = batch.params[0].device
    launch_plan = _launch_plan(batch, tile)
    targets = _targets(batch, scales, "scales")
    if launch_plan.n_bands == 0:
        return 0
    meta = cached_meta("coupled", batch, launch_plan.dims, device)
    dtypes = kernel_dtypes(batch)
    del dtypes["G"]  # the apply never reads the gradient
    _rmda_apply_kernel[(launch_plan.n_bands,)](
        meta, launch_plan.bands, targets, hyper,
        hyper if found_inf is None else found_inf,  # a pointer it never reads
        **dtypes, HAS_INF=found_inf is not None,
        RTNE=emulate_bf16_rtne(batch.params[0].dtype), BLOCK_R=tile[0], BLOCK_L=tile[1],
        num_warps=num_warps)
    return 1
