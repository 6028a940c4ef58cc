"""Pure-PyTorch RMDA step: multi-tensor ``torch._foreach_*`` ops plus one group-norm per tensor.

It is the readable statement of docs/algorithm.md, "The update", in torch ops and runs
wherever torch runs, on any layout. Unlike the fused backends it materialises the new
values (z, V, W, t, A) before writing them, so that a step with ``found_inf`` set commits
nothing, without reading found_inf on the host (no sync; torch.compile traces it whole).
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
    new_steps = torch._foreach_add(batch.steps, 1.0)
    betas = torch._foreach_sqrt(new_steps)
    step_sizes = torch._foreach_mul(betas, options.lr)  # s = lr * sqrt(t)
    new_alphas = torch._foreach_add(batch.alphas, step_sizes)

    # V += s * g, with g unscaled through s so low-precision grads are never rounded again
    grad_weights = (step_sizes if options.grad_scale is None
                    else torch._foreach_div(step_sizes, options.grad_scale))
    new_duals = torch._foreach_addcmul(batch.duals, batch.grads, grad_weights)

    zs = torch._foreach_div(new_duals, betas)  # z = W0 - V / beta
    torch._foreach_neg_(zs)
    torch._foreach_add_(zs, batch.initials)

    new_masks = []
    if options.prox:
        taus = torch._foreach_div(new_alphas, betas)  # tau = lam * A / beta
        torch._foreach_mul_(taus, options.lam)
        new_masks = [group_prox_(z, tau, options.grouping) for z, tau in zip(zs, taus)]

    # W <- (1 - c) W + c z, in the state dtype; low-precision params are rounded once
    new_params = torch._foreach_mul([p.to(z.dtype) for p, z in zip(batch.params, zs)],
                                    1.0 - options.momentum)
    torch._foreach_add_(new_params, zs, alpha=options.momentum)

    keep = None if options.found_inf is None else options.found_inf == 0
    written = [(batch.steps, new_steps), (batch.alphas, new_alphas), (batch.duals, new_duals),
               (batch.params, new_params)]
    if options.prox:
        written.append((batch.zero_masks, new_masks))
    for old, new in written:
        if keep is not None:
            new = [torch.where(keep, n, o) for n, o in zip(new, old)]
        torch._foreach_copy_(old, new)
