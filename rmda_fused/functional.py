"""The functional core of RMDA: one step over lists of tensors, dispatched to a backend.

Every backend module lives in ``rmda_fused/backends/`` and exposes

- ``unavailable_reason() -> str | None``: why it cannot run on this machine (None: it can);
- ``handles(device: torch.device) -> bool``: whether it can take tensors on that device;
- ``rmda_step_(params, grads, initials, duals, steps, alphas, zero_groups, views, *, lr,
  momentum, lam, grouping, grad_scale, found_inf)``: the in-place step of SPEC.md.

The lists are aligned, one entry per parameter that has a gradient. ``steps`` and ``alphas``
are 0-d tensors on the parameter's device (fp32, fp64 for fp64 parameters); ``views`` are the
:class:`~rmda_fused.grouping.GroupView` of each parameter (None for ``grouping='none'``),
computed here once so that no backend re-derives the group layout.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch
from torch import Tensor

from .grouping import check_grouping, group_view

# name -> module; the order is the preference of backend="auto" among those that handle a device
_BACKEND_MODULES = {
    "reference": "rmda_fused.backends.reference",
    "cpu": "rmda_fused.backends.cpu",
    "cuda": "rmda_fused.backends.cuda",
    "triton": "rmda_fused.backends.triton",
}
# Triton is never listed for CPU: it takes CPU tensors only in its (slow) interpreter
_AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(_BACKEND_MODULES[name])
    except Exception as exc:  # an import failure is the reason the backend is missing
        return None, f"import failed: {type(exc).__name__}: {exc}"
    reason = module.unavailable_reason()
    return (None, reason) if reason else (module, None)


def available_backends() -> dict[str, str | None]:
    """Every known backend mapped to None if it works here, else the reason it does not."""
    return {name: _load(name)[1] for name in _BACKEND_MODULES}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name ``backend`` means for tensors on ``device``."""
    if backend == "auto":
        return _resolve_auto(device.type)
    if backend not in _BACKEND_MODULES:
        raise ValueError(
            f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(_BACKEND_MODULES)}"
        )
    module, reason = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available here: {reason}")
    if not module.handles(device):
        raise RuntimeError(f"backend {backend!r} cannot run on {device.type} tensors")
    return backend


@functools.lru_cache(maxsize=None)
def _resolve_auto(device_type: str) -> str:
    skipped = []
    for name in _AUTO_PREFERENCE.get(device_type, ("reference",)):
        module, reason = _load(name)
        if module is not None and module.handles(torch.device(device_type)):
            break
        skipped.append(f"{name}: {reason or f'does not take {device_type} tensors'}")
    if skipped:  # a faster backend is missing: say why, once, rather than slow down silently
        warnings.warn(
            f"rmda_fused: backend='auto' uses {name!r} for {device_type} tensors because "
            + "; ".join(skipped), RuntimeWarning, stacklevel=3,
        )
    return name


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in _BACKEND_MODULES):
        raise ValueError(
            f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(_BACKEND_MODULES)}"
        )
    return backend


def rmda_step(
    params: list[Tensor],
    grads: list[Tensor],
    initials: list[Tensor],
    duals: list[Tensor],
    steps: list[Tensor],
    alphas: list[Tensor],
    zero_groups: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    lam: float,
    grouping: str,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One RMDA step (SPEC.md) for parameters that share lr, momentum, lam and grouping.

    Updates ``params``, ``duals``, ``steps``, ``alphas`` and ``zero_groups`` in place.
    ``zero_groups[i]`` (one bool per group, or None for ``grouping='none'``) receives which
    groups of the prox point z are exactly zero.
    """
    if not params:
        return
    check_grouping(grouping)
    lists = (grads, initials, duals, steps, alphas, zero_groups)
    if any(len(x) != len(params) for x in lists):
        raise ValueError("rmda_step: every tensor list must have one entry per parameter")
    name = resolve_backend(backend, params[0].device)
    module, _ = _load(name)
    views = [group_view(p.shape, grouping) for p in params]
    module.rmda_step_(
        params, grads, initials, duals, steps, alphas, zero_groups, views,
        lr=lr, momentum=momentum, lam=lam, grouping=grouping,
        grad_scale=grad_scale, found_inf=found_inf,
    )
