"""RMDA step with group LASSO over the (outer, groups, inner) view: input_channel and
output_channel, for conv (O, I, k...), pointwise (O, I, 1, 1) and linear (O, I) alike.

A tile is a set of consecutive groups: for each outer index o their elements are one
contiguous run of ``n_groups * inner`` entries (row o of the tile), so loads are coalesced
along the run and the group norm is a reduction over the strided (row) axis, then a
reduction of the columns into groups (one norm per group, computed once in fp32/fp64 and
broadcast back, so every element of a group sees the same scale and the same zero test).
A run longer than BLOCK_L (output_channel of a wide filter) is folded into several rows.

- Group set fits one BLOCK_R x BLOCK_L tile: ONE pass (read g, W, W0, V; write W, V, mask).
- Otherwise (more than BLOCK_R rows): the group set is split into row chunks over several
  programs. Pass 1 (this kernel) updates V and writes each chunk's partial sum of z^2;
  pass 2 (the apply kernel) sums the partials in a fixed order (deterministic, no atomics),
  re-reads V, W0, W, and writes W; its first chunk writes the mask. 8 more bytes per element
  (docs/algorithm.md, "Memory traffic").

With the default TILES a group set takes one pass when it has at most BLOCK_R tile rows:
input_channel (64 x 32): O <= 64 for kernels up to 32 taps (3x3, 5x5, 1x1, linear), O <= 32
for 7x7; output_channel (16 x 128): I*k*k <= 2048 (a 3x3 conv with I <= 227, a linear layer
with I <= 2048). Larger groups take the two passes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_D1, COL_D2, COL_D3, COL_G, COL_MASK, COL_P, COL_V, COL_W0, NCOL, NSCR,
    SCR_BETA, SCR_GRAD_WEIGHT, SCR_SKIP, SCR_TAU, LRUCache, cached_meta, div_exact,
    emulate_bf16_rtne, kernel_dtypes, momentum_weights, round_to, sqrt_exact, to_device,
)
from .rmda_scalars import rmda_scalars_

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

# (BLOCK_R, BLOCK_L, BLOCK_G) per grouping: input_channel runs are short (n_groups * k*k)
# and the rows many (O); output_channel runs are long (I * k*k), one row per group set, and
# hold few groups. BLOCK_G, the most groups per tile, bounds the column-to-group reduction.
TILES = {"input_channel": (64, 32, 32), "output_channel": (16, 128, 8)}
CHUNK_ITERS = 4  # a pass-1 program of a big group set covers CHUNK_ITERS * BLOCK_R rows

# the shape words of this family's meta rows: the group view, and how many groups a tile of
# this tensor holds
COL_OUTER, COL_GROUPS, COL_INNER, COL_TILE_GROUPS = COL_D0, COL_D1, COL_D2, COL_D3

# columns of the tile table (int64): the tensor, its first group in the tile, the tile rows
# [begin, end) this program covers, and for a chunked group set the partial-sum slot of
# this chunk, the set's first slot and its number of slots (all -1 / 0 for a one-pass tile)
(TILE_TENSOR, TILE_FIRST_GROUP, TILE_ROW_BEGIN, TILE_ROW_END, TILE_PARTIAL_SLOT,
 TILE_FIRST_SLOT, TILE_N_SLOTS) = map(tl.constexpr, range(7))
TCOL = 8  # one spare column keeps rows 64 bytes apart


@triton.jit
def _locate_tile(tiles, meta, scratch, TCOL: tl.constexpr):
    """This program's row of the tile table, and the meta and scratch rows of its tensor."""
    tile = tiles + tl.program_id(0).to(tl.int64) * TCOL
    tensor = tl.load(tile + TILE_TENSOR)
    return tile, meta + tensor * NCOL, scratch + tensor * NSCR


@triton.jit
def _tile_layout(tile, tensor_row, BLOCK_L: tl.constexpr):
    """(first group, number of groups, layout, group size |G|) of the tile's group set.

    ``layout`` = (offset of the first group in an outer index, elements between outer
    indices, run length, tile rows per outer index, inner or 1) is what _tile_offsets and
    _column_groups read."""
    first_group = tl.load(tile + TILE_FIRST_GROUP)
    outer = tl.load(tensor_row + COL_OUTER)
    groups = tl.load(tensor_row + COL_GROUPS)
    inner = tl.load(tensor_row + COL_INNER)
    n_groups = tl.minimum(tl.load(tensor_row + COL_TILE_GROUPS), groups - first_group)
    run = n_groups * inner
    rows_per_outer = tl.maximum(tl.cdiv(run, BLOCK_L), 1)
    layout = (first_group * inner, groups * inner, run, rows_per_outer,
              tl.maximum(inner, 1))  # inner == 0 (an empty group) never divides by zero
    return first_group, n_groups, layout, outer * inner


@triton.jit
def _tile_rows(tile, scratch_row, n_groups):
    """The tile rows [begin, end) this program covers and how many mask entries it writes
    (of the tile's ``n_groups``): none of either when found_inf skips the step."""
    row_begin = tl.load(tile + TILE_ROW_BEGIN)
    skip = tl.load(scratch_row + SCR_SKIP) != 0.0
    row_end = tl.where(skip, row_begin, tl.load(tile + TILE_ROW_END))
    return row_begin, row_end, tl.where(skip, 0, n_groups)


@triton.jit
def _group_threshold(scratch_row, group_size, F: tl.constexpr, FP64: tl.constexpr):
    """tau * sqrt(|G|), rounded on its own as in the reference. Computed at the top of the
    kernels, away from the ``norm - threshold`` it feeds: next to it, the compiler fuses
    the product and the difference into one fma, which rounds differently."""
    return tl.load(scratch_row + SCR_TAU) * sqrt_exact(group_size.to(F), FP64)


@triton.jit
def _tile_offsets(rows, tile_cols, layout, row_end, BLOCK_L: tl.constexpr):
    """Element offsets of tile rows ``rows`` and their in-bounds mask.

    Tile row r is chunk (r % rows_per_outer) of outer index (r // rows_per_outer): a run
    longer than BLOCK_L is folded into rows_per_outer rows."""
    group_offset, outer_stride, run, rows_per_outer = layout[0], layout[1], layout[2], layout[3]
    pos = ((rows % rows_per_outer) * BLOCK_L)[:, None] + tile_cols[None, :]
    offs = ((rows // rows_per_outer) * outer_stride + group_offset)[:, None] + pos
    return offs, (rows < row_end)[:, None] & (pos < run)


@triton.jit
def _column_groups(tile_cols, group_ids, layout):
    """[BLOCK_G, BLOCK_L] bool: which group of the tile each column belongs to (none past
    the run), to reduce columns into groups and broadcast group values back."""
    run, inner = layout[2], layout[4]
    return ((tile_cols // inner)[None, :] == group_ids[:, None]) & (tile_cols < run)[None, :]


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
def _tile_indices(BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr):
    """(tile rows, tile columns, group slots) of a BLOCK_R x BLOCK_L tile of BLOCK_G groups."""
    return tl.arange(0, BLOCK_R).to(tl.int64), tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_G)


@triton.jit
def _new_dual(v_ptr, g_ptr, offs, m, grad_weight, F: tl.constexpr):
    """V + (s / grad_scale) * g at ``offs`` (not stored)."""
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    return v + grad_weight * tl.load(g_ptr + offs, mask=m, other=0.0).to(F)


@triton.jit
def _prox_input(w0_ptr, v, offs, m, beta, F: tl.constexpr, FP64: tl.constexpr):
    """z = W0 - V / beta at ``offs``, before the prox."""
    w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
    return w0 - div_exact(v, beta, FP64)


@triton.jit
def _columns_to_groups(in_group, per_column):
    return tl.sum(tl.where(in_group, per_column[None, :], 0.0), axis=1)


@triton.jit
def _groups_to_columns(in_group, per_group):
    return tl.sum(tl.where(in_group, per_group[:, None], 0.0), axis=0)


@triton.jit
def _write_weight(p_ptr, offs, m, z, col_scale, c, one_minus_c, P: tl.constexpr,
                  F: tl.constexpr, RTNE: tl.constexpr):
    """W <- (1 - c) W + c * prox(z), the prox being z times its group's scale."""
    w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
    w = one_minus_c * w + c * (z * col_scale[None, :])
    tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)


@triton.jit
def _store_zero_mask(tensor_row, first_group, group_ids, zero, store):
    mask_ptr = tl.load(tensor_row + COL_MASK).to(tl.pointer_type(tl.int8))
    tl.store(mask_ptr + first_group + group_ids, zero.to(tl.int8), mask=store)


@triton.jit
def _rmda_grouped_kernel(
    meta, tiles, scratch, hyper, partial,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    TCOL: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    tile, tensor_row, scratch_row = _locate_tile(tiles, meta, scratch, TCOL)
    first_group, n_groups, layout, group_size = _tile_layout(tile, tensor_row, BLOCK_L)
    row_begin, row_end, mask_groups = _tile_rows(tile, scratch_row, n_groups)
    threshold = _group_threshold(scratch_row, group_size, F, FP64)
    g_ptr = tl.load(tensor_row + COL_G).to(tl.pointer_type(G))
    w0_ptr = tl.load(tensor_row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(tensor_row + COL_V).to(tl.pointer_type(F))
    beta = tl.load(scratch_row + SCR_BETA)
    grad_weight = tl.load(scratch_row + SCR_GRAD_WEIGHT)
    partial_slot = tl.load(tile + TILE_PARTIAL_SLOT)
    tile_rows, tile_cols, group_ids = _tile_indices(BLOCK_R, BLOCK_L, BLOCK_G)
    in_group = _column_groups(tile_cols, group_ids, layout)
    if partial_slot < 0:  # the whole group set is this tile: one pass
        offs, m = _tile_offsets(row_begin + tile_rows, tile_cols, layout, row_end, BLOCK_L)
        v = _new_dual(v_ptr, g_ptr, offs, m, grad_weight, F)
        z = _prox_input(w0_ptr, v, offs, m, beta, F, FP64)
        group_sumsq = _columns_to_groups(in_group, tl.sum(z * z, axis=0))
        scale, zero = _group_scale(group_sumsq, threshold, FP64)
        c, one_minus_c = momentum_weights(hyper, F)
        p_ptr = tl.load(tensor_row + COL_P).to(tl.pointer_type(P))
        tl.store(v_ptr + offs, v, mask=m)
        _write_weight(p_ptr, offs, m, z, _groups_to_columns(in_group, scale), c, one_minus_c,
                      P, F, RTNE)
        _store_zero_mask(tensor_row, first_group, group_ids, zero, group_ids < mask_groups)
    else:  # pass 1 of a big group set: V and this chunk's partial sums of z^2
        col_sumsq = tl.zeros([BLOCK_L], F)
        for r in range(row_begin, row_end, BLOCK_R):
            offs, m = _tile_offsets(r + tile_rows, tile_cols, layout, row_end, BLOCK_L)
            v = _new_dual(v_ptr, g_ptr, offs, m, grad_weight, F)
            z = _prox_input(w0_ptr, v, offs, m, beta, F, FP64)
            tl.store(v_ptr + offs, v, mask=m)
            col_sumsq += tl.sum(z * z, axis=0)
        tl.store(partial + partial_slot * BLOCK_G + group_ids,
                 _columns_to_groups(in_group, col_sumsq))


@triton.jit
def _rmda_grouped_apply_kernel(
    meta, tiles, scratch, hyper, partial,
    P: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    TCOL: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    tile, tensor_row, scratch_row = _locate_tile(tiles, meta, scratch, TCOL)
    first_group, n_groups, layout, group_size = _tile_layout(tile, tensor_row, BLOCK_L)
    row_begin, row_end, mask_groups = _tile_rows(tile, scratch_row, n_groups)
    threshold = _group_threshold(scratch_row, group_size, F, FP64)
    p_ptr = tl.load(tensor_row + COL_P).to(tl.pointer_type(P))
    w0_ptr = tl.load(tensor_row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(tensor_row + COL_V).to(tl.pointer_type(F))
    beta = tl.load(scratch_row + SCR_BETA)
    partial_slot = tl.load(tile + TILE_PARTIAL_SLOT)
    first_slot = tl.load(tile + TILE_FIRST_SLOT)
    n_slots = tl.load(tile + TILE_N_SLOTS)
    tile_rows, tile_cols, group_ids = _tile_indices(BLOCK_R, BLOCK_L, BLOCK_G)
    group_sumsq = tl.zeros([BLOCK_G], F)
    for k in range(0, n_slots):  # same order in every chunk's program: same norm, same mask
        group_sumsq += tl.load(partial + (first_slot + k) * BLOCK_G + group_ids)
    scale, zero = _group_scale(group_sumsq, threshold, FP64)
    col_scale = _groups_to_columns(_column_groups(tile_cols, group_ids, layout), scale)
    c, one_minus_c = momentum_weights(hyper, F)
    for r in range(row_begin, row_end, BLOCK_R):
        offs, m = _tile_offsets(r + tile_rows, tile_cols, layout, row_end, BLOCK_L)
        v = tl.load(v_ptr + offs, mask=m, other=0.0)
        z = _prox_input(w0_ptr, v, offs, m, beta, F, FP64)
        _write_weight(p_ptr, offs, m, z, col_scale, c, one_minus_c, P, F, RTNE)
    _store_zero_mask(tensor_row, first_group, group_ids, zero,
                     (group_ids < mask_groups) & (partial_slot == first_slot))


def plan(views, block_r: int, block_l: int, block_g: int):
    """Per-tensor shape words and the tile tables (one-pass tiles first, then the chunks of
    big group sets, which also form the apply kernel's table), plus the partial-sum slots."""
    dims, one_pass, chunked = [], [], []
    slots = 0
    chunk_rows = CHUNK_ITERS * block_r
    for tensor, (outer, groups, inner) in enumerate(views):
        tile_groups = block_g if inner == 0 else max(1, min(block_g, block_l // inner))
        dims.append((outer, groups, inner, tile_groups))
        for first_group in range(0, groups, tile_groups):
            run = min(tile_groups, groups - first_group) * inner
            n_rows = outer * max(1, triton.cdiv(run, block_l))
            if n_rows <= block_r:
                one_pass.append((tensor, first_group, 0, n_rows, -1, -1, 0, 0))
                continue
            starts = range(0, n_rows, chunk_rows)
            for k, row in enumerate(starts):
                chunked.append((tensor, first_group, row, min(row + chunk_rows, n_rows),
                                slots + k, slots, len(starts), 0))
            slots += len(starts)
    return dims, one_pass, chunked, slots


_PLAN_CACHE = LRUCache(64)


def rmda_grouped_step_(
    batch: StepBatch, *, grouping: str, hyper: torch.Tensor, lr: torch.Tensor | None,
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    tile: tuple[int, int, int] | None = None, num_warps: int = 8,
) -> int:
    """One RMDA step with channel group LASSO for a one-bucket batch (one device, one dtype
    per list, contiguous tensors, the group views of rmda_fused.grouping).

    ``tile`` overrides (BLOCK_R, BLOCK_L, BLOCK_G) (tests use tiny tiles to exercise the
    two-pass path on small shapes). Returns the number of launches.
    """
    if not len(batch):
        return 0
    device, state = batch.params[0].device, batch.duals[0].dtype
    block_r, block_l, block_g = tile or TILES[grouping]
    views = tuple(tuple(v) for v in batch.views)

    def build():
        dims, one_pass, chunked, slots = plan(views, block_r, block_l, block_g)
        return (dims, len(one_pass) + len(chunked), len(chunked),
                to_device(one_pass + chunked, device),
                to_device(chunked, device),
                torch.empty(max(slots, 1) * block_g, dtype=state, device=device),
                torch.empty(len(batch), NSCR.value, dtype=state, device=device))

    dims, n_tiles, n_chunked, tiles, chunk_tiles, partial, scratch = _PLAN_CACHE.get(
        (str(device), views, block_r, block_l, block_g, state), build)
    meta = cached_meta("grouped", batch, dims, device)
    rmda_scalars_(meta, scratch, len(batch), hyper, lr, grad_scale, found_inf)
    if n_tiles == 0:
        return 1
    dtypes = kernel_dtypes(batch)
    blocks = dict(TCOL=TCOL, RTNE=emulate_bf16_rtne(batch.params[0].dtype), BLOCK_R=block_r,
                  BLOCK_L=block_l, BLOCK_G=block_g, num_warps=num_warps)
    _rmda_grouped_kernel[(n_tiles,)](meta, tiles, scratch, hyper, partial, **dtypes, **blocks)
    if n_chunked == 0:
        return 2
    del dtypes["G"]  # the apply kernel never reads the gradient
    _rmda_grouped_apply_kernel[(n_chunked,)](meta, chunk_tiles, scratch, hyper, partial,
                                             **dtypes, **blocks)
    return 3
