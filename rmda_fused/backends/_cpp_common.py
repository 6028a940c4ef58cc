"""What the cpu and cuda backends share: packing a step's lists into ``rmda_fused::rmda_step_``.

The op (csrc/bindings.cpp) takes tensors that are contiguous and carry the dtypes of
SPEC.md (grad and initial in the parameter's dtype, dual/step/alpha in its state dtype).
Anything else, e.g. a channels_last parameter, whose contiguous group view does not
describe its memory, goes to the reference backend in the same call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..grouping import GroupView
from ..optimizer import state_dtype
from . import reference, split_lr


def _fits_kernel(p: Tensor, g: Tensor, w0: Tensor, v: Tensor) -> bool:
    return (
        p.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and g.dtype == p.dtype and w0.dtype == p.dtype and v.dtype == state_dtype(p)
        and g.device == p.device and w0.device == p.device and v.device == p.device
        and all(t.is_contiguous() for t in (p, g, w0, v))
        and not g.is_sparse
    )


def unavailable_reason(device_type: str) -> str | None:
    error = _extension.load_error()
    if error:
        return f"the rmda_fused C++ extension is unavailable: {error}"
    if device_type == "cuda" and not _extension.has_cuda_kernels():
        return "the rmda_fused extension was built without CUDA kernels (see RMDA_FUSED_BUILD_CUDA)"
    return None


def rmda_step_(
    params: list[Tensor],
    grads: list[Tensor],
    initials: list[Tensor],
    duals: list[Tensor],
    steps: list[Tensor],
    alphas: list[Tensor],
    zero_groups: list[Tensor | None],
    views: list[GroupView | None],
    *,
    lr: float | Tensor,
    momentum: float,
    lam: float,
    grouping: str,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    fused = [i for i in range(len(params))
             if _fits_kernel(params[i], grads[i], initials[i], duals[i])]
    if len(fused) < len(params):
        kept = set(fused)
        rest = [i for i in range(len(params)) if i not in kept]
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        reference.rmda_step_(
            *(pick(xs, rest) for xs in (params, grads, initials, duals, steps, alphas,
                                         zero_groups, views)),
            lr=lr, momentum=momentum, lam=lam, grouping=grouping,
            grad_scale=grad_scale, found_inf=found_inf,
        )
        if not fused:
            return
        params, grads, initials, duals, steps, alphas, zero_groups, views = (
            pick(xs, fused) for xs in (params, grads, initials, duals, steps, alphas,
                                       zero_groups, views))
    prox = grouping != "none"
    flat_views = [n for view in views for n in view] if prox else []
    lr_value, lr_tensor = split_lr(lr, params[0].device)
    torch.ops.rmda_fused.rmda_step_(
        params, grads, initials, duals, steps, alphas, list(zero_groups) if prox else [],
        flat_views, lr_value, float(momentum), float(lam) if prox else 0.0,
        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
    )
