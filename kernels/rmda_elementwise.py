"""RMDA step for grouping ``none`` and ``elementwise`` (L1) over a multi-tensor work list.

One launch updates every tensor of a dtype bucket, its scalars included: the grid is a
table of (tensor, start) tiles of BLOCK contiguous elements, so the kernel is compiled once
per dtype bucket, never per shape. Each program derives beta, s / grad_scale and tau from
the tensor's old t and A (rmda_scalars.tensor_step_scalars; the last of the tensor's tiles
to arrive writes the new ones). Each element is read once (g, W, W0, V) and written once
(W, V); with L1 the per-element zero mask is written by the same pass. With ALIGNED (every
array of the bucket on 16 bytes and every numel a multiple of 4) the compiler is told that
runs of 4 elements are contiguous and aligned, so it may issue 128-bit loads and stores.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_D1, COL_MASK, NCOL, VECTOR, LRUCache, cached_meta_and_counters, div_exact,
    element_pointers, emulate_bf16_rtne, kernel_dtypes, momentum_weights, pointers_aligned,
    round_to, to_device, vector_pointers,
)
from .rmda_scalars import amp_pointers, tensor_step_scalars

if TYPE_CHECKING:
    from rmda_fused.batch import StepBatch

BLOCK = 2048
# this family's shape words: the tensor's numel, and how many tiles (programs) it has
COL_NUMEL, COL_ARRIVALS = COL_D0, COL_D1


@triton.jit
def _rmda_elementwise_kernel(
    meta, tiles, counters, hyper, lr_ptr, scale_ptr, inf_ptr,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    PROX: tl.constexpr, RTNE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    tensor = tl.load(tiles + 2 * program)
    start = tl.load(tiles + 2 * program + 1)
    tensor_row = meta + tensor * NCOL
    beta, grad_weight, tau, live = tensor_step_scalars(
        tensor_row, tensor, tl.load(tensor_row + COL_ARRIVALS), counters, hyper, lr_ptr,
        scale_ptr, inf_ptr, F, FP64, HAS_LR_TENSOR, HAS_SCALE, HAS_INF)
    numel = tl.load(tensor_row + COL_NUMEL)
    c, one_minus_c = momentum_weights(hyper, F)
    # a skipped step (found_inf) masks every load and store: nothing changes
    limit = tl.where(live, numel, 0)

    offs = start + tl.arange(0, BLOCK)
    m = offs < limit
    if ALIGNED:  # start is a multiple of BLOCK, limit of VECTOR: so is the mask constant
        m = tl.max_constancy(m, VECTOR)
    p_ptrs, g_ptrs, w0_ptrs, v_ptrs = vector_pointers(
        element_pointers(tensor_row, P, G, I, F), offs, ALIGNED)
    g = tl.load(g_ptrs, mask=m, other=0.0).to(F)
    v = tl.load(v_ptrs, mask=m, other=0.0)
    v = v + grad_weight * g
    w0 = tl.load(w0_ptrs, mask=m, other=0.0).to(F)
    z = w0 - div_exact(v, beta, FP64)
    if PROX:  # L1: z <- sign(z) * max(|z| - tau, 0)
        keep = tl.abs(z) > tau
        # recorded zero where |z| <= tau, not where ~keep: a NaN is never recorded as zero
        zeroed = tl.abs(z) <= tau
        z = tl.where(keep, tl.where(z > 0, z - tau, z + tau), 0.0)
        mask_ptr = tl.load(tensor_row + COL_MASK).to(tl.pointer_type(tl.int8))
        tl.store(mask_ptr + offs, zeroed.to(tl.int8), mask=m)
    w = tl.load(p_ptrs, mask=m, other=0.0).to(F)
    w = one_minus_c * w + c * z
    tl.store(v_ptrs, v, mask=m)
    tl.store(p_ptrs, round_to(w, P, RTNE), mask=m)


def tile_counts(numels: tuple[int, ...], block: int) -> list[int]:
    """Programs per tensor: an empty tensor still takes one, which advances its t and A."""
    return [max(1, triton.cdiv(n, block)) for n in numels]


def _tiles(numels: tuple[int, ...], block: int) -> torch.Tensor:
    """int64 [n_tiles, 2]: (tensor index, first element) of every BLOCK-element tile."""
    counts = torch.tensor(tile_counts(numels, block), dtype=torch.int64)
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
    """One RMDA step for a one-bucket batch (one device, one dtype per list): one launch.

    With ``prox`` (L1) the batch's zero masks are per-element (bool, numel each); without
    it they are not read. Returns the number of kernel launches (for tests and the launch
    budget).
    """
    if not len(batch):
        return 0
    block = block or BLOCK
    device = batch.params[0].device
    numels = tuple(p.numel() for p in batch.params)
    counts = tile_counts(numels, block)
    meta, counters = cached_meta_and_counters(
        ("elementwise", prox), batch, list(zip(numels, counts)), device)
    tiles = _TILE_CACHE.get((str(device), numels, block),
                            lambda: to_device(_tiles(numels, block), device))
    pointers, has = amp_pointers(hyper, lr, grad_scale, found_inf)
    aligned = all(n % VECTOR.value == 0 for n in numels) and pointers_aligned(batch)
    _rmda_elementwise_kernel[(sum(counts),)](
        meta, tiles, counters, hyper, *pointers, **kernel_dtypes(batch), **has, PROX=prox,
        RTNE=emulate_bf16_rtne(batch.params[0].dtype), ALIGNED=aligned, BLOCK=block,
        num_warps=num_warps,
    )
    return 1
