"""Pure-PyTorch RMDA step: multi-tensor ``torch._foreach_*`` ops plus one group-norm per tensor.

It is the readable statement of docs/algorithm.md, "The update", in torch ops and runs
wherever torch runs, on any layout. Unlike the fused backends it materialises the new
values (z, V, W, t, A) before writing them, so that a step with ``found_inf`` set commits
nothing, without reading found_inf on the host (no sync; torch.compile traces it whole).
``rmda_partials_`` and ``rmda_apply_`` are the two halves of a partials -> reduce -> apply
step (rmda_fused/coupled.py), written from the same pieces; ``options.grouping`` says
whether a tensor's groups are its columns ("coupled", "input_channel") or its rows
("output_channel").
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..batch import StepBatch, StepOptions, state_dtype
from ..coupled import group_shape
from ..grouping import group_prox_, norm_dims


def unavailable_reason() -> str | None:
    return None


def handles(device: torch.device) -> bool:
    return True


def _dual_average(batch: StepBatch, options: StepOptions):
    """(new t, beta, new A, new V, z = W0 - V/beta) of every entry, nothing written."""
    new_steps = torch._foreach_add(batch.steps, 1.0)
    betas = torch._foreach_sqrt(new_steps)
    step_sizes = torch._foreach_mul(betas, options.lr)  # s = lr * sqrt(t)
    new_alphas = torch._foreach_add(batch.alphas, step_sizes)
    # V += s * g, with g unscaled through s so low-precision grads are never rounded again
    grad_weights = (step_sizes if options.grad_scale is None
                    else torch._foreach_div(step_sizes, options.grad_scale))
    new_duals = torch._foreach_addcmul(batch.duals, batch.grads, grad_weights)
    return new_steps, betas, new_alphas, new_duals, _prox_inputs(batch, new_duals, betas)


def _prox_inputs(batch: StepBatch, duals: list[Tensor], betas: list[Tensor]) -> list[Tensor]:
    zs = torch._foreach_div(duals, betas)  # z = W0 - V / beta
    torch._foreach_neg_(zs)
    torch._foreach_add_(zs, batch.initials)
    return zs


def _mixed(params: list[Tensor], zs: list[Tensor], momentum: float) -> list[Tensor]:
    """W <- (1 - c) W + c z, in the state dtype; low-precision params are rounded once."""
    new_params = torch._foreach_mul([p.to(z.dtype) for p, z in zip(params, zs)], 1.0 - momentum)
    torch._foreach_add_(new_params, zs, alpha=momentum)
    return new_params


def _commit(written: list[tuple[list[Tensor], list[Tensor]]], found_inf: Tensor | None) -> None:
    keep = None if found_inf is None else found_inf == 0
    for old, new in written:
        if keep is not None:
            new = [torch.where(keep, n, o) for n, o in zip(new, old)]
        torch._foreach_copy_(old, new)


def rmda_step_(batch: StepBatch, options: StepOptions) -> None:
    if not len(batch):
        return
    new_steps, betas, new_alphas, new_duals, zs = _dual_average(batch, options)
    new_masks = []
    if options.prox:
        taus = torch._foreach_div(new_alphas, betas)  # tau = lam * A / beta
        torch._foreach_mul_(taus, options.lam)
        new_masks = [group_prox_(z, tau, options.grouping) for z, tau in zip(zs, taus)]
    written = [(batch.steps, new_steps), (batch.alphas, new_alphas), (batch.duals, new_duals),
               (batch.params, _mixed(batch.params, zs, options.momentum))]
    if options.prox:
        written.append((batch.zero_masks, new_masks))
    _commit(written, options.found_inf)


def rmda_partials_(batch: StepBatch, options: StepOptions, partials: list[Tensor]) -> None:
    if not len(batch):
        return
    new_steps, _, new_alphas, new_duals, zs = _dual_average(batch, options)
    # options.grouping says which dim the groups index (columns, or rows for output_channel)
    sums = [z.square().sum(dim=norm_dims(z.dim(), options.grouping), dtype=state_dtype(z.dtype))
            for z in zs]
    _commit([(batch.steps, new_steps), (batch.alphas, new_alphas), (batch.duals, new_duals)],
            options.found_inf)
    torch._foreach_copy_(partials, sums)


def rmda_apply_(batch: StepBatch, options: StepOptions, scales: list[Tensor]) -> None:
    if not len(batch):
        return
    zs = _prox_inputs(batch, batch.duals, torch._foreach_sqrt(batch.steps))
    for z, scale in zip(zs, scales):  # the shrink factor of each group
        z.mul_(scale.reshape(group_shape(z.dim(), options.grouping)))
    _commit([(batch.params, _mixed(batch.params, zs, options.momentum))], options.found_inf)
