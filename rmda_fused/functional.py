"""The functional core of RMDA: one step over lists of tensors, and the one place that
decides which backend runs which tensors.

Every backend module lives in ``rmda_fused/backends/`` and exposes

- ``unavailable_reason() -> str | None``: why it cannot run on this machine (None: it can);
- ``handles(device: torch.device) -> bool``: whether it can take tensors on that device;
- ``rmda_step_(batch: StepBatch, options: StepOptions)``: the in-place step of
  docs/algorithm.md, "The update", on a batch this module has validated.

The fused backends (cpu, cuda, triton) take fp32/fp64/bf16/fp16 parameters whose memory is
dense (contiguous or permuted, e.g. channels_last) and laid out as their gradient's and
state's; anything else runs on ``reference`` in the same step, with a warning (once per
reason) that says why.
"""
from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from ._warnings import warn_caller
from .backends import cpu, cuda, reference, triton
from .batch import StepBatch, StepOptions, state_dtype
from .grouping import check_grouping, memory_group_view, memory_order

__all__ = ["rmda_step", "available_backends", "resolve_backend", "check_backend_name"]

# name -> module; imported eagerly (each module reports its own unavailability), so that
# resolving a backend under torch.compile is a plain dict lookup.
_BACKENDS: dict[str, ModuleType] = {
    "reference": reference, "cpu": cpu, "cuda": cuda, "triton": triton,
}
# the order is backend="auto"'s preference among those that handle a device type. Triton is
# never listed for CPU: it takes CPU tensors only in its (slow) interpreter. On CUDA the C++
# kernel comes first: on an H100 (benchmarks/gpu_session.sh, README "GPU") its ResNet-50
# step took about half the Triton backend's time, host and device time alike.
_AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
_FUSED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _unavailable(name: str) -> str | None:
    try:
        return _BACKENDS[name].unavailable_reason()
    except Exception as exc:  # a failing probe is the reason, never a crash at step time
        return f"{type(exc).__name__}: {exc}"


def available_backends() -> dict[str, str | None]:
    """Every known backend mapped to None if it works here, else the reason it does not."""
    return {name: _unavailable(name) for name in _BACKENDS}


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in _BACKENDS):
        raise ValueError(
            f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(_BACKENDS)}"
        )
    return backend


# (backend, device) -> backend name: a plain dict, so that a step under torch.compile
# resolves its backends by a guarded dict lookup (the optimizer resolves at construction)
_RESOLVED: dict[tuple[str, torch.device], str] = {}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name ``backend`` means for tensors on ``device``."""
    name = _RESOLVED.get((backend, device))
    if name is None:
        name = _RESOLVED[(backend, device)] = _resolve(backend, device)
        _extension_checks(device.type)  # looked up by every step's gradient check
    return name


# device type -> whether the C++ extension's gradient check runs there: a plain dict, as
# _RESOLVED, filled when a backend is resolved (the optimizer does that at construction)
_EXTENSION_CHECKS: dict[str, bool] = {}


def _extension_checks(device_type: str) -> bool:
    usable = _EXTENSION_CHECKS.get(device_type)
    if usable is None:
        usable = _EXTENSION_CHECKS[device_type] = (
            device_type in ("cpu", "cuda") and _unavailable(device_type) is None)
    return usable


def _resolve(backend: str, device: torch.device) -> str:
    check_backend_name(backend)
    if backend == "auto":
        return _resolve_auto(device.type)
    reason = _unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available here: {reason}")
    if not _BACKENDS[backend].handles(device):
        raise RuntimeError(f"backend {backend!r} cannot run on {device.type} tensors")
    return backend


@functools.lru_cache(maxsize=None)
def _resolve_auto(device_type: str) -> str:
    skipped = []
    device = torch.device(device_type)
    for name in _AUTO_PREFERENCE.get(device_type, ("reference",)):
        reason = _unavailable(name)
        if reason is None and _BACKENDS[name].handles(device):
            break
        skipped.append(f"{name}: {reason or f'does not take {device_type} tensors'}")
    if skipped:  # a faster backend is missing: say why, once, rather than slow down silently
        warn_caller(f"rmda_fused: backend='auto' uses {name!r} for {device_type} tensors "
                    "because " + "; ".join(skipped), RuntimeWarning)
    return name


@functools.lru_cache(maxsize=None)
def _warn_fallback(backend: str, reason: str) -> None:
    warn_caller(f"rmda_fused: backend {backend!r} cannot take {reason}; those parameters "
                "run on the 'reference' backend (slower, same update)", RuntimeWarning)


def _fallback_reason(p: Tensor, g: Tensor, w0: Tensor, v: Tensor, grouping: str) -> str | None:
    """Why a fused kernel cannot take this parameter (None: it can). The kernels walk the
    four tensors' memory in one order, through the group view of
    :func:`~rmda_fused.grouping.memory_group_view`."""
    if p.dtype not in _FUSED_PARAM_DTYPES:
        return f"{p.dtype} parameters"
    if memory_order(p) is None or not (p.stride() == g.stride() == w0.stride() == v.stride()):
        return ("parameters whose gradient or state has another memory layout, or whose "
                "memory is not dense")
    if grouping == "elementwise" and not p.is_contiguous():
        return ("elementwise groups of a permuted layout (e.g. channels_last): the zero "
                "mask follows the logical order")
    return None


def _describer(name: Callable[[int], str]) -> Callable[[int, Tensor], str]:
    return lambda i, p: f"{name(i)} (shape {tuple(p.shape)})"


def check_grads(params: list[Tensor], grads: list[Tensor],
                name: Callable[[int], str] = "parameter {}".format) -> None:
    """Check what a caller hands in anew every step, the parameters and their gradients:
    raise a ValueError/TypeError naming the first that does not fit (``name(i)`` names
    entry i). The optimizer checks only this per step: it made the state itself, and
    load_state_dict checks the state it loads."""
    describe = _describer(name)
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_complex() or p.is_complex():
            raise TypeError(f"rmda_step: RMDA does not support complex parameters or "
                            f"gradients ({describe(i, p)})")
        if not p.is_floating_point():
            raise TypeError(f"rmda_step: {describe(i, p)} is {p.dtype}, not floating point")
        if g.is_sparse:
            raise TypeError(f"rmda_step: RMDA does not support sparse gradients "
                            f"({describe(i, p)})")
        if g.shape != p.shape:
            raise ValueError(f"rmda_step: grad of {describe(i, p)} has shape "
                             f"{tuple(g.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"rmda_step: grad of {describe(i, p)} must have its dtype "
                            f"{p.dtype}, got {g.dtype}")
        if g.device != p.device:
            raise ValueError(f"rmda_step: grad of {describe(i, p)} must be on {p.device}, "
                             f"not {g.device}")


def check_batch(batch: StepBatch, options: StepOptions,
                name: Callable[[int], str] = "parameter {}".format) -> None:
    """:func:`check_grads`, and the state tensors of every entry: raise a
    ValueError/TypeError naming the first parameter whose tensors do not fit the step,
    before any tensor is written. ``name(i)`` names entry i of the batch."""
    check_grads(batch.params, batch.grads, name)
    prox = options.prox
    _describe = _describer(name)
    for i, (p, g, w0, v, t, a, mask, view) in enumerate(zip(*batch.lists())):
        for what, x in (("initial", w0), ("dual", v)):
            if x.shape != p.shape:
                raise ValueError(f"rmda_step: {what} of {_describe(i, p)} has shape "
                                 f"{tuple(x.shape)}")
        if w0.dtype != p.dtype:
            raise TypeError(f"rmda_step: initial of {_describe(i, p)} must have its dtype "
                            f"{p.dtype}, got {w0.dtype}")
        acc = state_dtype(p.dtype)
        if v.dtype != acc or t.dtype != acc or a.dtype != acc:
            raise TypeError(f"rmda_step: dual, step and alpha of {_describe(i, p)} must be "
                            f"{acc}, got {v.dtype}, {t.dtype}, {a.dtype}")
        if t.numel() != 1 or a.numel() != 1:
            raise ValueError(f"rmda_step: step and alpha of {_describe(i, p)} must have one "
                             "element")
        if any(x.device != p.device for x in (w0, v, t, a)):
            raise ValueError(f"rmda_step: every tensor of {_describe(i, p)} must be on "
                             f"{p.device}")
        if prox:
            if view is None or view.outer * view.groups * view.inner != p.numel():
                raise ValueError(f"rmda_step: group view {view} does not cover "
                                 f"{_describe(i, p)}")
            if (mask is None or mask.dtype != torch.bool or mask.numel() != view.groups
                    or mask.device != p.device or not mask.is_contiguous()):
                raise ValueError(f"rmda_step: the zero mask of {_describe(i, p)} must be a "
                                 f"contiguous bool tensor of {view.groups} entries on "
                                 f"{p.device}")


def nonfinite_flag(grads: list[Tensor]) -> Tensor | None:
    """found_inf for gradients no GradScaler has checked: a float32 scalar on the first
    gradient's device, 1 when a gradient has a NaN or an infinity (None: no gradients).
    No host sync.

    Where the C++ extension runs (CPU, and CUDA when built with it) this is its read-only
    multi-tensor check (csrc/nonfinite_cpu.cpp, csrc/nonfinite_cuda.cu): one parallel region
    or one launch per dtype, and no per-tensor results, so its host cost hardly grows with
    the number of tensors. Without the extension: on CPU a plain fp32 sum per tensor (a NaN
    or an infinity makes it non-finite; so does a finite gradient whose sum exceeds the fp32
    range), elsewhere GradScaler's check with a scale of exactly 1, which leaves every
    gradient bit-identical (it has no bf16 kernel: bf16 takes multi-tensor L1 norms)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    if not by_device:
        return None
    device = next(iter(by_device))
    parts = []
    for where, gs in by_device.items():
        flag = torch.zeros((), dtype=torch.float32, device=where)
        if _extension_checks(where.type):
            torch.ops.rmda_fused.nonfinite_(gs, flag)
            parts.append(flag)
        else:
            parts.append(_nonfinite_without_extension(gs, flag))
    if len(parts) == 1 and parts[0].device == device:
        return parts[0]
    return torch.stack([x.to(device, non_blocking=True) for x in parts]).amax()


def _nonfinite_without_extension(grads: list[Tensor], flag: Tensor) -> Tensor:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    sums: list[Tensor] = []
    for dtype, gs in by_dtype.items():
        if flag.device.type == "cpu":
            sums += [g.sum(dtype=torch.float32) for g in gs]
        elif dtype in _AMP_CHECK_DTYPES:
            torch._amp_foreach_non_finite_check_and_unscale_(gs, flag,
                                                             _constant(1.0, flag.device))
        else:
            sums += torch._foreach_norm(gs, 1, dtype=torch.float32)
    if sums:
        return torch.maximum(flag, torch.stack(sums).isfinite().all().logical_not().float())
    return flag


_AMP_CHECK_DTYPES = (torch.float32, torch.float16, torch.float64)
_CONSTANTS: dict[tuple[float, torch.device], Tensor] = {}  # a plain dict, as _RESOLVED


def _constant(value: float, device: torch.device) -> Tensor:
    """A float32 0-d tensor of ``value`` on ``device``, made once."""
    key = (value, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full((), value, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def _signed(options: StepOptions, device: torch.device) -> StepOptions:
    """``maximize`` as every backend can take it: every backend divides the gradient by
    grad_scale (through the step size, never per element), so a negated grad_scale is the
    exact sign flip of the gradient."""
    if not options.maximize:
        return options
    scale = _constant(-1.0, device) if options.grad_scale is None else options.grad_scale.neg()
    return dataclasses.replace(options, grad_scale=scale, maximize=False)


def route_batch(batch: StepBatch, grouping: str,
                backend: str) -> list[tuple[torch.device, str, list[int]]]:
    """Which backend runs which entries of ``batch``: (device, backend name, positions),
    per device the fused backend for what it can take and ``reference`` for the rest (with
    a warning, once per reason). Every device's backend is resolved before this returns."""
    per_device = [(device, on_device, resolve_backend(backend, device))
                  for device, on_device in batch.positions_by_device()]
    routes = []
    for device, positions, name in per_device:
        if name != "reference":
            reasons = [_fallback_reason(batch.params[i], batch.grads[i], batch.initials[i],
                                        batch.duals[i], grouping) for i in positions]
            for reason in {r for r in reasons if r}:
                _warn_fallback(name, reason)
            rest = [i for i, r in zip(positions, reasons) if r]
            if rest:
                routes.append((device, "reference", rest))
                positions = [i for i, r in zip(positions, reasons) if not r]
        if positions:
            routes.append((device, name, positions))
    return routes


def run_route(name: str, device: torch.device, batch: StepBatch,
              options: StepOptions) -> None:
    """One routed batch on backend ``name``; the AMP scalars follow it to ``device``."""
    _BACKENDS[name].rmda_step_(batch, _signed(_on(options, device), device))


def planned_step(name: str, batch: StepBatch, grouping: str, watch, positions: list[int]):
    """Backend ``name``'s step of ``batch`` planned once (csrc/step_plan.cpp's PlannedStep,
    reading gradient k from ``watch`` at ``positions[k]``), or None where the backend plans
    no steps and takes lists each step (:func:`run_route`)."""
    plan = getattr(_BACKENDS[name], "planned_step", None)
    return None if plan is None else plan(batch, grouping, watch, positions)


def run_planned(name: str, device: torch.device, planned, options: StepOptions) -> None:
    """A planned step (:func:`planned_step`) with this step's options."""
    _BACKENDS[name].run_planned(planned, device, _signed(_on(options, device), device))


def planned_nonfinite_flag(watches: list, device: torch.device) -> Tensor | None:
    """:func:`nonfinite_flag` of the gradients of ``watches`` (csrc/step_plan.cpp's
    GradWatch, all on ``device``) without listing them, where the extension checks that
    device; None where it does not, and the caller lists them."""
    if not _extension_checks(device.type):
        return None
    flag = torch.zeros((), dtype=torch.float32, device=device)
    for watch in watches:
        watch.nonfinite_(flag)
    return flag


def run_coupled_phase(phase: str, name: str, device: torch.device, batch: StepBatch,
                      options: StepOptions, buffers: list[Tensor]) -> None:
    """One half of a coupled step on backend ``name`` (``phase`` is ``rmda_partials_`` or
    ``rmda_apply_``, rmda_fused/coupled.py), with the AMP scalars on ``device``."""
    getattr(_BACKENDS[name], phase)(batch, _signed(_on(options, device), device), buffers)


def step_batch_(batch: StepBatch, options: StepOptions, backend: str) -> None:
    """One step of a validated batch: per device, the fused backend takes what it can and
    the rest runs on ``reference`` (:func:`route_batch`). The optimizer replays the same
    routes through its step plans (rmda_fused/_step_plan.py)."""
    for device, name, positions in route_batch(batch, options.grouping, backend):
        # positions are in order: all of them is the batch itself, no copy
        routed = batch if len(positions) == len(batch) else batch.select(positions)
        run_route(name, device, routed, options)


def _on(options: StepOptions, device: torch.device) -> StepOptions:
    """``options`` with the AMP scalars on ``device`` (GradScaler may keep them elsewhere)
    and 0-d (a caller's one-element (1,) tensor would not broadcast in torch's foreach ops)."""
    moved = {}
    for key in ("grad_scale", "found_inf"):
        value = getattr(options, key)
        if value is not None and (value.device != device or value.dim() != 0):
            moved[key] = value.reshape(()).to(device, non_blocking=True)
    if not moved:
        return options
    return dataclasses.replace(options, **moved)


def rmda_step(
    params: list[Tensor],
    grads: list[Tensor],
    initials: list[Tensor],
    duals: list[Tensor],
    steps: list[Tensor],
    alphas: list[Tensor],
    zero_masks: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    lam: float,
    grouping: str,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    maximize: bool = False,
    backend: str = "auto",
) -> None:
    """One RMDA step (docs/algorithm.md, "The update") for parameters that share lr,
    momentum, lam and grouping.

    Updates ``params``, ``duals``, ``steps``, ``alphas`` and ``zero_masks`` in place.
    ``zero_masks[i]`` (one bool per group, or None for ``grouping='none'``) receives which
    groups of the prox point z are exactly zero. ``maximize`` steps up the gradient. Every
    argument is checked, and the backend resolved, before any tensor is written.
    """
    check_grouping(grouping)
    if grouping == "coupled":
        raise ValueError("rmda_step: coupled groups span tensors and need their "
                         "channel_groups: step them with rmda_fused.RMDA")
    check_backend_name(backend)
    views = [memory_group_view(p, grouping) for p in params]
    batch = StepBatch(params, grads, initials, duals, steps, alphas, zero_masks, views)
    options = StepOptions(lr, momentum, lam, grouping, grad_scale, found_inf, maximize)
    if not len(batch):
        return
    check_batch(batch, options)
    step_batch_(batch, options, backend)
