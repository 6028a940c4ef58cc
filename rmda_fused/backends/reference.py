"""Pure-PyTorch RMDA step: multi-tensor ``torch._foreach_*`` ops plus one group-norm per tensor.

It is the readable statement of docs/algorithm.md, "The update", in torch ops and runs
wherever torch runs, on any layout. Unlike the fused backends it materialises z (one
temporary per parameter) and, when a GradScaler passes ``found_inf``, reads it on the host
(one sync per step, as torch's non-fused optimizers do).
"""
from __future__ import annotations

import torch

from ..batch import StepBatch, StepOptions
from ..grouping import group_prox_


def unavailable_reason() -> str | None:
    return None


def handles(device: torch.device) -> bool:
    return True


def rmda_step_(batch: StepBatch, options: StepOptions) -> None:
    if not len(batch):
        return
    if options.found_inf is not None and bool(options.found_inf.item()):
        return
    steps, alphas = batch.steps, batch.alphas
    torch._foreach_add_(steps, 1.0)
    betas = torch._foreach_sqrt(steps)
    step_sizes = torch._foreach_mul(betas, options.lr)  # s = lr * sqrt(t)
    torch._foreach_add_(alphas, step_sizes)

    # V += s * g, with g unscaled through s so low-precision grads are never rounded again
    grad_weights = (step_sizes if options.grad_scale is None
                    else torch._foreach_div(step_sizes, options.grad_scale))
    torch._foreach_addcmul_(batch.duals, batch.grads, grad_weights)

    zs = torch._foreach_div(batch.duals, betas)  # z = W0 - V / beta
    torch._foreach_neg_(zs)
    torch._foreach_add_(zs, batch.initials)

    if options.prox:
        taus = torch._foreach_div(alphas, betas)  # tau = lam * A / beta
        torch._foreach_mul_(taus, options.lam)
        for z, tau, mask in zip(zs, taus, batch.zero_masks):
            mask.copy_(group_prox_(z, tau, options.grouping))

    # W <- (1 - c) W + c z, in the state dtype; low-precision params are rounded once
    params = batch.params
    work = [p if p.dtype == z.dtype else p.to(z.dtype) for p, z in zip(params, zs)]
    torch._foreach_mul_(work, 1.0 - options.momentum)
    torch._foreach_add_(work, zs, alpha=options.momentum)
    rounded = [(p, w) for p, w in zip(params, work) if p is not w]
    if rounded:
        torch._foreach_copy_([p for p, _ in rounded], [w for _, w in rounded])
