"""What the cpu and cuda backends share: a step batch packed into ``rmda_fused::rmda_step_``,
or into the two kernel phases of a coupled-group step, ``rmda_fused::rmda_partials_`` and
``rmda_fused::rmda_apply_`` (schemas in csrc/bindings.cpp). The functional core hands over
validated batches of dense tensors with their memory-order group views."""
from __future__ import annotations

import torch

from .. import _extension
from ..batch import StepBatch, StepOptions
from . import split_lr


def unavailable_reason(device_type: str) -> str | None:
    error = _extension.load_error()
    if error:
        return f"the rmda_fused C++ extension is unavailable: {error}"
    if device_type == "cuda" and not _extension.has_cuda_kernels():
        return "the rmda_fused extension was built without CUDA kernels (see RMDA_FUSED_BUILD_CUDA)"
    return None


def rmda_step_(batch: StepBatch, options: StepOptions) -> None:
    prox = options.prox
    torch.ops.rmda_fused.rmda_step_(
        batch.params, batch.grads, batch.initials, batch.duals, batch.steps, batch.alphas,
        list(batch.zero_masks) if prox else [], batch.flat_views,
        *_step_scalars(batch.params[0].device, options))


def planned_step(batch: StepBatch, grouping: str, watch, positions: list[int]):
    """rmda_step_ of ``batch`` as one object (csrc/step_plan.cpp's PlannedStep) that holds
    its tensors and takes gradient k from ``watch`` at ``positions[k]``: a step then passes
    no tensor list from Python."""
    prox = grouping != "none"
    return torch.classes.rmda_fused.PlannedStep(
        watch, positions, batch.params, batch.initials, batch.duals, batch.steps,
        batch.alphas, list(batch.zero_masks) if prox else [],
        batch.flat_views if prox else [])


def run_planned(planned, device: torch.device, options: StepOptions) -> None:
    planned.step(*_step_scalars(device, options))


def _step_scalars(device: torch.device, options: StepOptions) -> tuple:
    """rmda_step_'s arguments after the tensor lists."""
    lr_value, lr_tensor = split_lr(options.lr, device)
    return (lr_value, float(options.momentum), float(options.lam) if options.prox else 0.0,
            lr_tensor, options.grad_scale, options.found_inf)


def rmda_partials_(batch: StepBatch, options: StepOptions, partials: list[torch.Tensor]) -> None:
    """Advances t, A and V of every tensor and writes each input_channel group's sum of z^2
    into ``partials`` (one state-dtype entry per group); nothing moves when found_inf is
    nonzero."""
    lr_value, lr_tensor = split_lr(options.lr, batch.params[0].device)
    torch.ops.rmda_fused.rmda_partials_(
        batch.params, batch.grads, batch.initials, batch.duals, batch.steps, batch.alphas,
        partials, batch.flat_views, lr_value,
        lr_tensor=lr_tensor, grad_scale=options.grad_scale, found_inf=options.found_inf,
    )


def rmda_apply_(batch: StepBatch, options: StepOptions, scales: list[torch.Tensor]) -> None:
    """W <- (1 - c) W + c * scales[i][k] * z over group k of tensor i, with t as
    rmda_partials_ left it; nothing moves when found_inf is nonzero."""
    torch.ops.rmda_fused.rmda_apply_(
        batch.params, batch.initials, batch.duals, batch.steps, scales, batch.flat_views,
        float(options.momentum), found_inf=options.found_inf,
    )
