"""RMDA step with group LASSO over the (outer, groups, inner) view: input_channel and
output_channel, for conv (O, I, k...), pointwise (O, I, 1, 1) and linear (O, I) alike.

A tile is a set of ``ng`` consecutive groups: for each outer index o its elements are one
contiguous run of ``ng * inner`` entries (row o of the tile), so loads are coalesced along
the run and the group norm is a reduction over the strided (row) axis, then a one-hot
reduction of the columns into groups (one norm per group, computed once in fp32/fp64 and
broadcast back, so every element of a group sees the same scale and the same zero test).
A run longer than BLOCK_L (output_channel of a wide filter) is folded into several rows.

- Group set fits one BLOCK_R x BLOCK_L tile: ONE pass (read g, W, W0, V; write W, V, mask).
- Otherwise (more than BLOCK_R rows): the group set is split into row chunks over several
  programs. Pass 1 (this kernel) updates V and writes each chunk's partial sum of z^2;
  pass 2 (the apply kernel) sums the partials in a fixed order (deterministic, no atomics),
  re-reads V, W0, W, and writes W; its first chunk writes the mask. 8 more bytes per element.

With the default TILES a group set takes one pass when it has at most BLOCK_R tile rows:
input_channel (64 x 32): O <= 64 for kernels up to 32 taps (3x3, 5x5, 1x1, linear), O <= 32
for 7x7; output_channel (16 x 128): I*k*k <= 2048 (a 3x3 conv with I <= 227, a linear layer
with I <= 2048). Larger groups take the two passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_D1, COL_D2, COL_D3, COL_G, COL_MASK, COL_P, COL_V, COL_W0, HYP_C, HYP_OMC,
    NCOL, NSCR, SCR_BETA, SCR_SCALE, SCR_SKIP, SCR_TAU, TORCH_TO_TL, LRUCache, cached_meta,
    emulate_bf16_rtne, round_to, to_device,
)
from .rmda_scalars import rmda_scalars_

# (BLOCK_R, BLOCK_L, BLOCK_G) per grouping: input_channel runs are short (ng * k*k) and
# the rows many (O); output_channel runs are long (I * k*k), one row per group set, and
# hold few groups. BLOCK_G, the most groups per tile, bounds the one-hot reduction.
TILES = {"input_channel": (64, 32, 32), "output_channel": (16, 128, 8)}
CHUNK_ITERS = 4  # a pass-1 program of a big group set covers CHUNK_ITERS * BLOCK_R rows
TCOL = 8  # tile table: tid, g0, row start, row end, partial slot, first slot, n slots, -


@triton.jit
def _group_scale(sumsq, thr, FP64: tl.constexpr):
    # Triton's fp32 sqrt and "/" are approximate on GPUs; the _rn forms round like the
    # reference (fp64 ones already do)
    n = tl.sqrt(sumsq) if FP64 else tl.sqrt_rn(sumsq)
    keep = n > thr  # n == 0 is never kept: the division below never selects 0/0
    den = tl.where(keep, n, 1.0)
    scale = tl.where(keep, (n - thr) / den if FP64 else tl.math.div_rn(n - thr, den), 0.0)
    return scale, ~keep


@triton.jit
def _tile_offsets(rows, cc, nh, row_stride, base, r1, run, BLOCK_L: tl.constexpr):
    # tile row r is chunk (r % nh) of outer index (r // nh): a run longer than BLOCK_L is
    # folded into nh rows
    pos = ((rows % nh) * BLOCK_L)[:, None] + cc[None, :]
    offs = ((rows // nh) * row_stride + base)[:, None] + pos
    return offs, (rows < r1)[:, None] & (pos < run)


@triton.jit
def _load_tile_info(tiles, meta, scratch, hyper, F: tl.constexpr, FP64: tl.constexpr,
                    TCOL: tl.constexpr, BLOCK_L: tl.constexpr):
    tile = tiles + tl.program_id(0).to(tl.int64) * TCOL
    tid = tl.load(tile + 0)
    g0 = tl.load(tile + 1)
    r0 = tl.load(tile + 2)
    r1 = tl.load(tile + 3)
    row = meta + tid * NCOL
    outer = tl.load(row + COL_D0)
    groups = tl.load(row + COL_D1)
    inner = tl.load(row + COL_D2)
    ng = tl.minimum(tl.load(row + COL_D3), groups - g0)
    run = ng * inner
    nh = tl.maximum(tl.cdiv(run, BLOCK_L), 1)
    scr = scratch + tid * NSCR
    skip = tl.load(scr + SCR_SKIP) != 0.0
    r1 = tl.where(skip, r0, r1)  # found_inf: no row is touched
    ng = tl.where(skip, 0, ng)  # ... and no mask entry
    size = (outer * inner).to(F)
    thr = tl.load(scr + SCR_TAU) * (tl.sqrt(size) if FP64 else tl.sqrt_rn(size))
    c = tl.load(hyper + HYP_C).to(F)
    omc = tl.load(hyper + HYP_OMC).to(F)
    return (tile, row, g0, r0, r1, ng, run, nh, groups * inner, g0 * inner,
            tl.maximum(inner, 1), scr, thr, c, omc)


@triton.jit
def _rmda_grouped_kernel(
    meta, tiles, scratch, hyper, partial,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    TCOL: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    (tile, row, g0, r0, r1, ng, run, nh, row_stride, base, inner_d, scr, thr, c,
     omc) = _load_tile_info(tiles, meta, scratch, hyper, F, FP64, TCOL, BLOCK_L)
    g_ptr = tl.load(row + COL_G).to(tl.pointer_type(G))
    w0_ptr = tl.load(row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(row + COL_V).to(tl.pointer_type(F))
    beta = tl.load(scr + SCR_BETA)
    weight = tl.load(scr + SCR_SCALE)
    pslot = tl.load(tile + 4)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    cc = tl.arange(0, BLOCK_L)
    gg = tl.arange(0, BLOCK_G)
    onehot = ((cc // inner_d)[None, :] == gg[:, None]) & (cc < run)[None, :]
    if pslot < 0:  # the whole group set is this tile: one pass
        offs, m = _tile_offsets(r0 + rr, cc, nh, row_stride, base, r1, run, BLOCK_L)
        v = tl.load(v_ptr + offs, mask=m, other=0.0)
        v = v + weight * tl.load(g_ptr + offs, mask=m, other=0.0).to(F)
        w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
        z = w0 - (v / beta if FP64 else tl.math.div_rn(v, beta))
        colsq = tl.sum(z * z, axis=0)
        sumsq = tl.sum(tl.where(onehot, colsq[None, :], 0.0), axis=1)
        scale, zero = _group_scale(sumsq, thr, FP64)
        scale_c = tl.sum(tl.where(onehot, scale[:, None], 0.0), axis=0)
        p_ptr = tl.load(row + COL_P).to(tl.pointer_type(P))
        w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
        w = omc * w + c * (z * scale_c[None, :])
        tl.store(v_ptr + offs, v, mask=m)
        tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)
        mask_ptr = tl.load(row + COL_MASK).to(tl.pointer_type(tl.int8))
        tl.store(mask_ptr + g0 + gg, zero.to(tl.int8), mask=gg < ng)
    else:  # pass 1 of a big group set: V and this chunk's partial sums of z^2
        acc = tl.zeros([BLOCK_L], F)
        for r in range(r0, r1, BLOCK_R):
            offs, m = _tile_offsets(r + rr, cc, nh, row_stride, base, r1, run, BLOCK_L)
            v = tl.load(v_ptr + offs, mask=m, other=0.0)
            v = v + weight * tl.load(g_ptr + offs, mask=m, other=0.0).to(F)
            w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
            z = w0 - (v / beta if FP64 else tl.math.div_rn(v, beta))
            tl.store(v_ptr + offs, v, mask=m)
            acc += tl.sum(z * z, axis=0)
        sumsq = tl.sum(tl.where(onehot, acc[None, :], 0.0), axis=1)
        tl.store(partial + pslot * BLOCK_G + gg, sumsq)


@triton.jit
def _rmda_grouped_apply_kernel(
    meta, tiles, scratch, hyper, partial,
    P: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    TCOL: tl.constexpr, RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr,
):
    (tile, row, g0, r0, r1, ng, run, nh, row_stride, base, inner_d, scr, thr, c,
     omc) = _load_tile_info(tiles, meta, scratch, hyper, F, FP64, TCOL, BLOCK_L)
    p_ptr = tl.load(row + COL_P).to(tl.pointer_type(P))
    w0_ptr = tl.load(row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(row + COL_V).to(tl.pointer_type(F))
    beta = tl.load(scr + SCR_BETA)
    pslot = tl.load(tile + 4)
    pfirst = tl.load(tile + 5)
    nslots = tl.load(tile + 6)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    cc = tl.arange(0, BLOCK_L)
    gg = tl.arange(0, BLOCK_G)
    sumsq = tl.zeros([BLOCK_G], F)
    for k in range(0, nslots):  # same order in every chunk's program: same norm, same mask
        sumsq += tl.load(partial + (pfirst + k) * BLOCK_G + gg)
    scale, zero = _group_scale(sumsq, thr, FP64)
    onehot = ((cc // inner_d)[None, :] == gg[:, None]) & (cc < run)[None, :]
    scale_c = tl.sum(tl.where(onehot, scale[:, None], 0.0), axis=0)
    for r in range(r0, r1, BLOCK_R):
        offs, m = _tile_offsets(r + rr, cc, nh, row_stride, base, r1, run, BLOCK_L)
        v = tl.load(v_ptr + offs, mask=m, other=0.0)
        w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
        z = w0 - (v / beta if FP64 else tl.math.div_rn(v, beta))
        w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
        w = omc * w + c * (z * scale_c[None, :])
        tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)
    mask_ptr = tl.load(row + COL_MASK).to(tl.pointer_type(tl.int8))
    tl.store(mask_ptr + g0 + gg, zero.to(tl.int8), mask=(gg < ng) & (pslot == pfirst))


def plan(views, block_r: int, block_l: int, block_g: int):
    """Per-tensor shape words and the tile tables (one-pass tiles first, then the chunks of
    big group sets, which also form the apply kernel's table), plus the partial-sum slots."""
    dims, one_pass, chunked = [], [], []
    slots = 0
    chunk_rows = CHUNK_ITERS * block_r
    for tid, (outer, groups, inner) in enumerate(views):
        bg = block_g if inner == 0 else max(1, min(block_g, block_l // inner))
        dims.append((outer, groups, inner, bg))
        for g0 in range(0, groups, bg):
            run = min(bg, groups - g0) * inner
            nrows = outer * max(1, triton.cdiv(run, block_l))
            if nrows <= block_r:
                one_pass.append((tid, g0, 0, nrows, -1, -1, 0, 0))
                continue
            starts = range(0, nrows, chunk_rows)
            for k, r in enumerate(starts):
                chunked.append((tid, g0, r, min(r + chunk_rows, nrows), slots + k, slots,
                                len(starts), 0))
            slots += len(starts)
    return dims, one_pass, chunked, slots


_PLAN_CACHE = LRUCache(64)


def rmda_grouped_step_(
    params, grads, initials, duals, steps, alphas, masks, views, *, grouping: str,
    hyper: torch.Tensor, lr: torch.Tensor | None, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, tile: tuple[int, int, int] | None = None, num_warps: int = 8,
) -> int:
    """One RMDA step with channel group LASSO for a dtype bucket (shared dtypes, device).

    ``views``: (outer, groups, inner) per tensor, from rmda_fused.grouping; every tensor
    must be contiguous. ``tile`` overrides (BLOCK_R, BLOCK_L, BLOCK_G) (tests use tiny tiles to
    exercise the two-pass path on small shapes). Returns the number of launches.
    """
    if not params:
        return 0
    device, fdtype = params[0].device, duals[0].dtype
    block_r, block_l, block_g = tile or TILES[grouping]
    views = tuple(tuple(v) for v in views)

    def build():
        dims, one_pass, chunked, slots = plan(views, block_r, block_l, block_g)
        return (dims, len(one_pass) + len(chunked), len(chunked),
                to_device(one_pass + chunked, device),
                to_device(chunked, device),
                torch.empty(max(slots, 1) * block_g, dtype=fdtype, device=device),
                torch.empty(len(params), NSCR.value, dtype=fdtype, device=device))

    dims, n_tiles, n_chunked, tiles, chunk_tiles, partial, scratch = _PLAN_CACHE.get(
        (str(device), views, block_r, block_l, block_g, fdtype), build)
    meta = cached_meta("grouped", params, grads, initials, duals, steps, alphas, masks, dims,
                       device)
    rmda_scalars_(meta, scratch, len(params), hyper, lr, grad_scale, found_inf)
    if n_tiles == 0:
        return 1
    fp64 = fdtype == torch.float64
    types = dict(P=TORCH_TO_TL[params[0].dtype], I=TORCH_TO_TL[initials[0].dtype],
                 F=TORCH_TO_TL[fdtype], FP64=fp64)
    blocks = dict(TCOL=TCOL, RTNE=emulate_bf16_rtne(params[0].dtype), BLOCK_R=block_r,
                  BLOCK_L=block_l, BLOCK_G=block_g, num_warps=num_warps)
    _rmda_grouped_kernel[(n_tiles,)](meta, tiles, scratch, hyper, partial,
                                     G=TORCH_TO_TL[grads[0].dtype], **types, **blocks)
    if n_chunked == 0:
        return 2
    _rmda_grouped_apply_kernel[(n_chunked,)](meta, chunk_tiles, scratch, hyper, partial,
                                             **types, **blocks)
    return 3
