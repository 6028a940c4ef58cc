"""The per-tensor scalar step of RMDA, launched before the element kernels.

For every tensor i of a bucket: t += 1, beta = sqrt(t), s = lr * beta, A += s,
tau = lam * A / beta; it writes (beta, s / grad_scale, tau, skip) to a scratch row that the
element kernels read. Doing this in its own tiny launch is what makes the in-place update of
t and A race-free: every program of the element kernels reads the new values from scratch,
and exactly one lane ever writes each t and A.
With ``found_inf`` nonzero nothing is written to t or A and skip = 1, so the element
kernels leave V, W and the masks untouched: the step changes nothing, as GradScaler expects.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    COL_ALPHA, COL_STEP, HYP_LAM, HYP_LR, NCOL, NSCR, SCR_BETA, SCR_GRAD_WEIGHT, SCR_SKIP,
    SCR_TAU, div_exact, sqrt_exact,
)

BLOCK_T = 128


@triton.jit(do_not_specialize=["n_tensors"])
def _rmda_scalars_kernel(
    meta, scratch, n_tensors, hyper, lr_ptr, scale_ptr, inf_ptr,
    F: tl.constexpr, FP64: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n_tensors
    row = meta + i.to(tl.int64) * NCOL
    t_ptr = tl.load(row + COL_STEP, mask=valid, other=0).to(tl.pointer_type(F))
    a_ptr = tl.load(row + COL_ALPHA, mask=valid, other=0).to(tl.pointer_type(F))
    if HAS_LR_TENSOR:  # the caller's one-element lr tensor
        lr = tl.load(lr_ptr).to(F)
    else:
        lr = tl.load(hyper + HYP_LR).to(F)
    t = tl.load(t_ptr, mask=valid, other=0.0) + 1.0
    beta = sqrt_exact(t, FP64)
    s = beta * lr
    alpha = tl.load(a_ptr, mask=valid, other=0.0) + s
    tau = div_exact(alpha, beta, FP64) * tl.load(hyper + HYP_LAM).to(F)
    grad_weight = s
    if HAS_SCALE:  # V += (s / grad_scale) * g: the gradient is unscaled through s
        grad_weight = div_exact(s, tl.load(scale_ptr).to(F), FP64)
    skip = tl.zeros([BLOCK], F)
    if HAS_INF:
        skip += (tl.load(inf_ptr) != 0).to(F)
    write = valid & (skip == 0.0)
    tl.store(t_ptr, t, mask=write)
    tl.store(a_ptr, alpha, mask=write)
    out = scratch + i.to(tl.int64) * NSCR
    tl.store(out + SCR_BETA, beta, mask=valid)
    tl.store(out + SCR_GRAD_WEIGHT, grad_weight, mask=valid)
    tl.store(out + SCR_TAU, tau, mask=valid)
    tl.store(out + SCR_SKIP, skip, mask=valid)


def rmda_scalars_(meta: torch.Tensor, scratch: torch.Tensor, n_tensors: int,
                  hyper: torch.Tensor, lr: torch.Tensor | None,
                  grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """Advance t and A of ``n_tensors`` tensors (state dtype = ``scratch.dtype``) and fill
    ``scratch`` [n_tensors, NSCR]. ``lr``: a device tensor, or None to read it from ``hyper``.
    """
    if n_tensors == 0:
        return
    fp64 = scratch.dtype == torch.float64
    # an absent tensor is passed as ``hyper``: the kernel needs a pointer it never reads
    _rmda_scalars_kernel[(triton.cdiv(n_tensors, BLOCK_T),)](
        meta, scratch, n_tensors, hyper,
        hyper if lr is None else lr,
        hyper if grad_scale is None else grad_scale,
        hyper if found_inf is None else found_inf,
        F=tl.float64 if fp64 else tl.float32, FP64=fp64, HAS_LR_TENSOR=lr is not None,
        HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        BLOCK=BLOCK_T, num_warps=4,
    )
