"""RMDA step for grouping ``none`` and ``elementwise`` (L1) over a multi-tensor work list.

One launch updates every tensor of a dtype bucket: the grid is a table of (tensor, start)
tiles of BLOCK contiguous elements, so the kernel is compiled once per dtype bucket, never
per shape. Each element is read once (g, W, W0, V) and written once (W, V); with L1 the
per-element zero mask is written by the same pass. The scalars kernel (rmda_scalars) must
run first: this one reads beta, s/grad_scale, tau and skip from its scratch rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    COL_D0, COL_G, COL_MASK, COL_P, COL_V, COL_W0, HYP_C, HYP_OMC, NCOL, NSCR, SCR_BETA,
    SCR_SCALE, SCR_SKIP, SCR_TAU, TORCH_TO_TL, LRUCache, cached_meta, emulate_bf16_rtne,
    round_to, to_device,
)
from .rmda_scalars import rmda_scalars_

BLOCK = 2048


@triton.jit
def _rmda_elementwise_kernel(
    meta, tiles, scratch, hyper,
    P: tl.constexpr, G: tl.constexpr, I: tl.constexpr, F: tl.constexpr, FP64: tl.constexpr,
    PROX: tl.constexpr, RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    row = meta + tid * NCOL
    p_ptr = tl.load(row + COL_P).to(tl.pointer_type(P))
    g_ptr = tl.load(row + COL_G).to(tl.pointer_type(G))
    w0_ptr = tl.load(row + COL_W0).to(tl.pointer_type(I))
    v_ptr = tl.load(row + COL_V).to(tl.pointer_type(F))
    numel = tl.load(row + COL_D0)
    scr = scratch + tid * NSCR
    beta = tl.load(scr + SCR_BETA)
    weight = tl.load(scr + SCR_SCALE)
    skip = tl.load(scr + SCR_SKIP) != 0.0
    c = tl.load(hyper + HYP_C).to(F)
    omc = tl.load(hyper + HYP_OMC).to(F)
    # a skipped step (found_inf) masks every load and store: nothing changes
    limit = tl.where(skip, 0, numel)

    offs = start + tl.arange(0, BLOCK)
    m = offs < limit
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(F)
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    v = v + weight * g
    w0 = tl.load(w0_ptr + offs, mask=m, other=0.0).to(F)
    z = w0 - (v / beta if FP64 else tl.math.div_rn(v, beta))  # fp32 "/" is approximate
    if PROX:  # L1: z <- sign(z) * max(|z| - tau, 0); zero where !(|z| > tau)
        tau = tl.load(scr + SCR_TAU)
        keep = tl.abs(z) > tau
        z = tl.where(keep, tl.where(z > 0, z - tau, z + tau), 0.0)
        mask_ptr = tl.load(row + COL_MASK).to(tl.pointer_type(tl.int8))
        tl.store(mask_ptr + offs, (~keep).to(tl.int8), mask=m)
    w = tl.load(p_ptr + offs, mask=m, other=0.0).to(F)
    w = omc * w + c * z
    tl.store(v_ptr + offs, v, mask=m)
    tl.store(p_ptr + offs, round_to(w, P, RTNE), mask=m)


def _tiles(numels: tuple[int, ...], block: int) -> torch.Tensor:
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tid = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first[tid]) * block
    return torch.stack([tid, start], dim=1)


_TILE_CACHE = LRUCache(64)


def rmda_elementwise_step_(
    params, grads, initials, duals, steps, alphas, masks, *, hyper: torch.Tensor,
    lr: torch.Tensor | None, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    prox: bool, block: int | None = None, num_warps: int = 8,
) -> int:
    """One RMDA step for a dtype bucket (every list shares its dtypes and device).

    ``masks`` are the per-element zero masks (bool, numel each) when ``prox`` (L1), else
    ignored. Returns the number of kernel launches (for tests and the launch budget).
    """
    if not params:
        return 0
    block = block or BLOCK
    device = params[0].device
    numels = tuple(p.numel() for p in params)
    masks = masks if prox else [None] * len(params)
    meta = cached_meta(("elementwise", prox), params, grads, initials, duals, steps, alphas,
                       masks, [(n,) for n in numels], device)
    tiles, scratch = _TILE_CACHE.get(
        (str(device), numels, block, duals[0].dtype),
        lambda: (to_device(_tiles(numels, block), device),
                 torch.empty(len(params), NSCR.value, dtype=duals[0].dtype, device=device)))
    rmda_scalars_(meta, scratch, len(params), hyper, lr, grad_scale, found_inf)
    n_tiles = sum(triton.cdiv(n, block) for n in numels)
    if n_tiles == 0:
        return 1
    fp64 = duals[0].dtype == torch.float64
    _rmda_elementwise_kernel[(n_tiles,)](
        meta, tiles, scratch, hyper,
        P=TORCH_TO_TL[params[0].dtype], G=TORCH_TO_TL[grads[0].dtype],
        I=TORCH_TO_TL[initials[0].dtype], F=TORCH_TO_TL[duals[0].dtype], FP64=fp64,
        PROX=prox, RTNE=emulate_bf16_rtne(params[0].dtype), BLOCK=block,
        num_warps=num_warps,
    )
    return 2
