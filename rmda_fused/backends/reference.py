"""Pure-PyTorch RMDA step: multi-tensor ``torch._foreach_*`` ops plus one group-norm per tensor.

It is the readable statement of SPEC.md in torch ops and runs wherever torch runs. Unlike the
fused backends it materialises z (one temporary per parameter) and, when a GradScaler passes
``found_inf``, reads it on the host (one sync per step, as torch's non-fused optimizers do).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..grouping import GroupView, group_prox_


def unavailable_reason() -> str | None:
    return None


def handles(device: torch.device) -> bool:
    return True


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
    if found_inf is not None and bool(found_inf.item()):
        return
    torch._foreach_add_(steps, 1.0)
    betas = torch._foreach_sqrt(steps)
    step_sizes = torch._foreach_mul(betas, lr)  # s = lr * sqrt(t)
    torch._foreach_add_(alphas, step_sizes)

    # V += s * g, with g unscaled through s so low-precision grads are never rounded again
    grad_weights = step_sizes if grad_scale is None else torch._foreach_div(step_sizes, grad_scale)
    torch._foreach_addcmul_(duals, grads, grad_weights)

    zs = torch._foreach_div(duals, betas)  # z = W0 - V / beta
    torch._foreach_neg_(zs)
    torch._foreach_add_(zs, initials)

    if grouping != "none":
        taus = torch._foreach_div(alphas, betas)  # tau = lam * A / beta
        torch._foreach_mul_(taus, lam)
        for z, tau, mask in zip(zs, taus, zero_groups):
            mask.copy_(group_prox_(z, tau, grouping))

    # W <- (1 - c) W + c z, in the state dtype; low-precision params are rounded once
    work = [p if p.dtype == z.dtype else p.to(z.dtype) for p, z in zip(params, zs)]
    torch._foreach_mul_(work, 1.0 - momentum)
    torch._foreach_add_(work, zs, alpha=momentum)
    rounded = [(p, w) for p, w in zip(params, work) if p is not w]
    if rounded:
        torch._foreach_copy_([p for p, _ in rounded], [w for _, w in rounded])
