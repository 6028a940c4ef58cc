"""RMDA step for grouping ``none`` and ``elementwise`` (L1) over a multi-tensor work list.

One launch updates every tensor of a dtype bucket: the grid is a table of (tensor, start)
tiles of BLOCK contiguous elements, so the kernel is compiled once per dtype bucket, never
per shape. Each element is read once (g, W, W0, V) and written once (W, V); with L1 the
per-element zero mask is written by the same pass. The scalars kernel (rmda_scalars) must
run first: this one reads beta, s / grad_scale, tau and skip from its scratch rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_G, COL_MASK, COL_P, COL_V, COL_W0, NCOL, NSCR, SCR_BETA, SCR_GRAD_WEIGHT,
    SCR_SKIP, SCR_TAU, LRUCache, cached_meta, div_exact, emulate_bf16_rtne, kernel_dtypes,
    momentum_weights, round_to, to_device,
)
from .rmda_scalars import rmda_scalars_

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

BLOCK = 2048
COL_NUMEL = COL_D0  # this family's only shape word


@triton.jit
def _rmda_elementwise_kernel(
    meta, tiles, scratch, hyper,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    PROX: tl.constexpr, RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    tensor = tl.load(tiles + 2 * program)
    start = tl.load(tiles + 2 * program + 1)
    tensor_row = meta + tensor * NCOL
    p_ptr = tl.load(tensor_row + COL_P).to(tl.pointer_type(P))
    g_ptr = tl.load(tensor_row + COL_G).to(tl.pointer_type(G))
    w0_ptr = tl.load(tensor_row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(tensor_row + COL_V).to(tl.pointer_type(F))
    numel = tl.load(tensor_row + COL_NUMEL)
    scratch_row = scratch + tensor * NSCR
    beta = tl.load(scratch_row + SCR_BETA)
    grad_weight = tl.load(scratch_row + SCR_GRAD_WEIGHT)
    skip = tl.load(scratch_row + SCR_SKIP) != 0.0
    c, one_minus_c = momentum_weights(hyper, F)
    # a skipped step (found_inf) masks every load and store: nothing changes
    limit = tl.where(skip, 0, numel)

    offs = start + tl.arange(0, BLOCK)
    m = offs < limit
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(F)
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    v = v + grad_weight * g
    w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
    z = w0 - div_exact(v, beta, FP64)
    if PROX:  # L1: z <- sign(z) * max(|z| - tau, 0)
        tau = tl.load(scratch_row + SCR_TAU)
        keep = tl.abs(z) > tau
        # recorded zero where |z| <= tau, not where ~keep: a NaN is never recorded as zero
        zeroed = tl.abs(z) <= tau
        z = tl.where(keep, tl.where(z > 0, z - tau, z + tau), 0.0)
        mask_ptr = tl.load(tensor_row + COL_MASK).to(tl.pointer_type(tl.int8))
        tl.store(mask_ptr + offs, zeroed.to(tl.int8), mask=m)
    w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
    w = one_minus_c * w + c * z
    tl.store(v_ptr + offs, v, mask=m)
    tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)


def _tiles(numels: tuple[int, ...], block: int) -> torch.Tensor:
    """int64 [n_tiles, 2]: (tensor index, first element) of every BLOCK-element tile."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_tile = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first_tile[tensor]) * block
    return torch.stack([tensor, start], dim=1)


_TILE_CACHE = LRUCache(64)


def rmda_elementwise_step_(
    batch: StepBatch, *, hyper: torch.Tensor, lr: torch.Tensor | None,
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, prox: bool,
    block: int | None = None, num_warps: int = 8,
) -> int:
    """One RMDA step for a one-bucket batch (one device, one dtype per list).

    With ``prox`` (L1) the batch's zero masks are per-element (bool, numel each); without
    it they are not read. Returns the number of kernel launches (for tests and the launch
    budget).
    """
    if not len(batch):
        return 0
    block = block or BLOCK
    device = batch.params[0].device
    state = batch.duals[0].dtype
    numels = tuple(p.numel() for p in batch.params)
    meta = cached_meta(("elementwise", prox), batch, [(n,) for n in numels], device)
    tiles, scratch = _TILE_CACHE.get(
        (str(device), numels, block, state),
        lambda: (to_device(_tiles(numels, block), device),
                 torch.empty(len(batch), NSCR.value, dtype=state, device=device)))
    rmda_scalars_(meta, scratch, len(batch), hyper, lr, grad_scale, found_inf)
    n_tiles = sum(triton.cdiv(n, block) for n in numels)
    if n_tiles == 0:
        return 1
    _rmda_elementwise_kernel[(n_tiles,)](
        meta, tiles, scratch, hyper, **kernel_dtypes(batch), PROX=prox,
        RTNE=emulate_bf16_rtne(batch.params[0].dtype), BLOCK=block, num_warps=num_warps,
    )
    return 2
