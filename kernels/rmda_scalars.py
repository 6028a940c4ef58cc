"""The per-tensor scalar step of RMDA: t += 1, beta = sqrt(t), s = lr * beta, A += s,
tau = lam * A / beta, and the weight s / grad_scale of g in V += weight * g.

The element kernels derive these themselves (:func:`tensor_step_scalars`): every program
of a tensor computes them from the OLD t and A, then arrives at the tensor's counter; the
program whose arrival completes the count writes the new t and A and resets the counter,
so no program reads a t or A that another has already advanced, and a step is one launch.

:func:`rmda_scalars_` is the same step as a launch of its own, for kernels that read the
scalars from a scratch table: it writes (beta, s / grad_scale, tau, skip) per tensor.
With ``found_inf`` nonzero nothing is written to t or A and skip = 1: the step changes
nothing, as GradScaler expects.
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


@triton.jit
def step_lr(hyper, lr_ptr, F: tl.constexpr, HAS_LR_TENSOR: tl.constexpr):
    if HAS_LR_TENSOR:  # the caller's one-element lr tensor
        lr = tl.load(lr_ptr).to(F)
    else:
        lr = tl.load(hyper + HYP_LR).to(F)
    return lr


@triton.jit
def advance(t_old, alpha_old, lr, hyper, scale_ptr, F: tl.constexpr, FP64: tl.constexpr,
            HAS_SCALE: tl.constexpr):
    """(t, A, beta, s / grad_scale, tau) of this step from the previous t and A."""
    t = t_old + 1.0
    beta = sqrt_exact(t, FP64)
    s = beta * lr
    alpha = alpha_old + s
    tau = div_exact(alpha, beta, FP64) * tl.load(hyper + HYP_LAM).to(F)
    grad_weight = s
    if HAS_SCALE:  # V += (s / grad_scale) * g: the gradient is unscaled through s
        grad_weight = div_exact(s, tl.load(scale_ptr).to(F), FP64)
    return t, alpha, beta, grad_weight, tau


@triton.jit
def tensor_step_scalars(tensor_row, tensor, arrivals, counters, hyper, lr_ptr, scale_ptr,
                        inf_ptr, F: tl.constexpr, FP64: tl.constexpr,
                        HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_INF: tl.constexpr):
    """(beta, s / grad_scale, tau, live) of one tensor for one of its ``arrivals`` programs;
    ``live`` is false when found_inf skips the step.

    The arrival is acq_rel: every program's read of the old t and A happens before the
    last arrival, whose program alone writes the new ones and resets the counter to 0 for
    the next step (no host work: a CUDA graph replays it as it is)."""
    t_ptr = tl.load(tensor_row + COL_STEP).to(tl.pointer_type(F))
    a_ptr = tl.load(tensor_row + COL_ALPHA).to(tl.pointer_type(F))
    lr = step_lr(hyper, lr_ptr, F, HAS_LR_TENSOR)
    t, alpha, beta, grad_weight, tau = advance(tl.load(t_ptr), tl.load(a_ptr), lr, hyper,
                                               scale_ptr, F, FP64, HAS_SCALE)
    live = tl.full([], 1, tl.int1)
    if HAS_INF:
        live = tl.load(inf_ptr) == 0
    # every thread of the program loads t and A, one thread arrives: the barrier orders all
    # the loads before that arrival's release
    tl.debug_barrier()
    arrived = tl.atomic_add(counters + tensor, 1, sem="acq_rel")
    last = arrived == arrivals - 1
    tl.store(t_ptr, t, mask=last & live)
    tl.store(a_ptr, alpha, mask=last & live)
    tl.store(counters + tensor, 0, mask=last)
    return beta, grad_weight, tau, live


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
    t, alpha, beta, grad_weight, tau = advance(
        tl.load(t_ptr, mask=valid, other=0.0), tl.load(a_ptr, mask=valid, other=0.0),
        step_lr(hyper, lr_ptr, F, HAS_LR_TENSOR), hyper, scale_ptr, F, FP64, HAS_SCALE)
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


def amp_pointers(hyper: torch.Tensor, lr: torch.Tensor | None,
                 grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None):
    """Kernel arguments for the optional lr, grad_scale and found_inf tensors (an absent
    one is passed as ``hyper``: the kernel needs a pointer it never reads) and their
    HAS_* constexprs."""
    return ((hyper if lr is None else lr, hyper if grad_scale is None else grad_scale,
             hyper if found_inf is None else found_inf),
            dict(HAS_LR_TENSOR=lr is not None, HAS_SCALE=grad_scale is not None,
                 HAS_INF=found_inf is not None))


def rmda_scalars_(meta: torch.Tensor, scratch: torch.Tensor, n_tensors: int,
                  hyper: torch.Tensor, lr: torch.Tensor | None,
                  grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """Advance t and A of ``n_tensors`` tensors (state dtype = ``scratch.dtype``) and fill
    ``scratch`` [n_tensors, NSCR]. ``lr``: a device tensor, or None to read it from ``hyper``.
    """
    if n_tensors == 0:
        return
    fp64 = scratch.dtype == torch.float64
    pointers, has = amp_pointers(hyper, lr, grad_scale, found_inf)
    _rmda_scalars_kernel[(triton.cdiv(n_tensors, BLOCK_T),)](
        meta, scratch, n_tensors, hyper, *pointers,
        F=tl.float64 if fp64 else tl.float32, FP64=fp64, **has, BLOCK=BLOCK_T, num_warps=4,
    )
