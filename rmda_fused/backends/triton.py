"""Triton backend: the whole RMDA step fused, multi-tensor (kernels in rmda_fused.kernels).

Per param group and dtype bucket: one tiny launch for the per-tensor scalars (t, A, beta,
s, tau), then one launch for every element (grouping none/elementwise, or channel groups that
fit a tile), plus one apply launch only when some group set is too big for one tile.
No host sync: lr (a float is written to a small device tensor), grad_scale and found_inf are
read by the kernels from device memory, and a step with found_inf set changes nothing.
Runs on CUDA tensors; on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 when
triton was imported), which is for testing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..grouping import GroupView
from . import split_lr

_IMPORT_ERROR: str | None = None
try:
    import triton  # noqa: F401

    from rmda_fused import kernels as _kernels
    from rmda_fused.kernels._common import TORCH_TO_TL, hyper_tensor
except Exception as exc:  # the reason is reported, never a silent fallback
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    _kernels = None

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton kernels cannot be imported: {_IMPORT_ERROR}"
    if _kernels.interpreted():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to test on CPU)"
    try:
        triton.runtime.driver.active.get_current_device()
    except Exception as exc:
        return f"triton has no working GPU driver: {type(exc).__name__}: {exc}"
    return None


def handles(device: torch.device) -> bool:
    if _kernels is None:
        return False
    # the interpreter dereferences table pointers in host memory: CPU tensors only there
    return device.type == ("cpu" if _kernels.interpreted() else "cuda")


def _check(params, grads, initials, duals, steps, alphas, zero_groups, views, grouping):
    device = params[0].device
    for i, (p, g, w0, v, t, a) in enumerate(zip(params, grads, initials, duals, steps, alphas)):
        where = f"parameter {i} (shape {tuple(p.shape)})"
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"triton backend: unsupported dtype {p.dtype} for {where}")
        tensors = (p, g, w0, v, t, a) + (() if zero_groups[i] is None else (zero_groups[i],))
        if any(x.device != device for x in tensors):
            raise ValueError(f"triton backend: every tensor of {where} must be on {device}")
        if g.is_sparse or g.shape != p.shape or w0.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"triton backend: grad/initial/dual of {where} must be dense "
                             f"and of the parameter's shape")
        if g.dtype not in TORCH_TO_TL or w0.dtype not in TORCH_TO_TL:
            raise TypeError(f"triton backend: unsupported grad/initial dtype for {where}")
        if t.numel() != 1 or a.numel() != 1 or t.dtype != v.dtype or a.dtype != v.dtype:
            raise TypeError(f"triton backend: step/alpha of {where} must be one-element "
                            f"tensors of the dual's dtype {v.dtype}")
        if grouping == "none" and _same_dense_layout(p, g, w0, v):
            continue  # no groups: any dense layout works if all four share it
        if not all(x.is_contiguous() for x in (p, g, w0, v)):
            raise ValueError(
                f"triton backend: {where} (or its grad/state) is not contiguous (e.g. "
                f"channels_last); grouping {grouping!r} needs the contiguous (outer, groups, "
                f"inner) layout of rmda_fused.grouping. Use .contiguous() params or "
                f"backend='reference'")
        if grouping != "none":
            mask = zero_groups[i]
            want = views[i].groups
            if mask is None or mask.dtype != torch.bool or mask.numel() != want \
                    or not mask.is_contiguous():
                raise ValueError(f"triton backend: zero_groups of {where} must be a "
                                 f"contiguous bool tensor of {want} entries")


def _same_dense_layout(p: Tensor, *others: Tensor) -> bool:
    dense = (p.is_contiguous()
             or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
             or (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)))
    return dense and all(x.stride() == p.stride() for x in others)


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
) -> int:
    """The step of SPEC.md; returns the number of kernel launches it made."""
    if not params:
        return 0
    if _kernels is None:
        raise RuntimeError(unavailable_reason())
    _check(params, grads, initials, duals, steps, alphas, zero_groups, views, grouping)
    device = params[0].device
    lr, lr_tensor = split_lr(lr, device)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)

    # one bucket per dtype combination: the table's pointers are typed at compile time
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g, w0, v) in enumerate(zip(params, grads, initials, duals)):
        buckets.setdefault((p.dtype, g.dtype, w0.dtype, v.dtype), []).append(i)
    launches = 0
    for index in buckets.values():
        lists = [[lst[i] for i in index] for lst in
                 (params, grads, initials, duals, steps, alphas, zero_groups)]
        hyper = hyper_tensor(lists[0], device, lr, momentum, lam)
        common = dict(hyper=hyper, lr=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
        if grouping in ("none", "elementwise"):
            launches += _kernels.rmda_elementwise_step_(
                *lists, prox=grouping == "elementwise", **common)
        else:
            launches += _kernels.rmda_grouped_step_(
                *lists, [views[i] for i in index], grouping=grouping, **common)
    return launches
