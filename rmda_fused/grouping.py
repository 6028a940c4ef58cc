"""Which entries of a tensor form one regularization group.

This module is the only place that knows how a grouping maps onto a tensor's shape; every
backend (reference, C++, Triton) asks it, so the backends cannot disagree about groups.

Every grouping is expressed over a contiguous ``(outer, groups, inner)`` view of the tensor:
group ``g`` is the slice ``view[:, g, :]`` of ``outer * inner`` entries.

- ``input_channel``  (O, I, k...) -> (O, I, prod(k))   one group per input channel
- ``output_channel`` (O, I, k...) -> (1, O, I*prod(k)) one group per filter / row
- ``elementwise``    any shape    -> (1, numel, 1)     L1: every entry its own group
- ``coupled``        (O, I, k...) -> (O, I, prod(k))   input-channel slices whose norm is
  taken together with the slices of other tensors that read the same channel
  (:mod:`rmda_fused.coupled`): per tensor, the kernels walk the input_channel view
- ``none``           no groups, no proximal step
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .batch import state_dtype

GROUPINGS = ("input_channel", "output_channel", "elementwise", "coupled", "none")
_CHANNEL_GROUPINGS = ("input_channel", "output_channel", "coupled")


class GroupView(NamedTuple):
    outer: int
    groups: int
    inner: int

    @property
    def group_size(self) -> int:
        return self.outer * self.inner


def check_grouping(grouping: object) -> str:
    if not isinstance(grouping, str) or grouping not in GROUPINGS:
        raise ValueError(
            f"unknown grouping {grouping!r}; expected one of {', '.join(GROUPINGS)}"
        )
    return grouping


def effective_grouping(shape: torch.Size | tuple[int, ...], grouping: str) -> str:
    """``grouping`` as it applies to a tensor of ``shape``: a tensor with fewer than 2 dims
    (a bias, a norm's weight) has no channels, so in a channel grouping it is not
    regularized ("none"); it still takes the dual-averaging update."""
    if grouping in _CHANNEL_GROUPINGS and len(shape) < 2:
        return "none"
    return grouping


def group_view(shape: torch.Size | tuple[int, ...], grouping: str) -> GroupView | None:
    """The (outer, groups, inner) view of a contiguous tensor, or None for ``none``."""
    if grouping == "none":
        return None
    if grouping == "elementwise":
        return GroupView(1, math.prod(shape), 1)
    if grouping in ("input_channel", "coupled"):
        return GroupView(shape[0], shape[1], math.prod(shape[2:]))
    if grouping == "output_channel":
        return GroupView(1, shape[0], math.prod(shape[1:]))
    raise ValueError(f"unknown grouping {grouping!r}")


def memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The dims of ``tensor`` from outermost to innermost in memory when its memory is dense
    (a contiguous tensor or a permutation of one, e.g. channels_last); None otherwise."""
    if tensor.is_contiguous():  # the usual case, asked every step: no sort, no permute
        return list(range(tensor.dim()))
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))  # stable for ties
    return order if tensor.permute(order).is_contiguous() else None


def memory_group_view(tensor: torch.Tensor, grouping: str) -> GroupView | None:
    """The (outer, groups, inner) view of ``tensor``'s memory, which a fused kernel walks:
    ``group_view`` for a contiguous tensor; for a dense permuted one (channels_last), a
    channel group is still one index of one dim, so its dim's place in memory order gives
    the view. Elementwise groups of a permuted tensor, and non-dense tensors, get the
    logical view: the functional core runs those on ``reference``, which ignores views."""
    view = group_view(tensor.shape, grouping)
    if view is None or grouping == "elementwise" or tensor.is_contiguous():
        return view
    order = memory_order(tensor)
    if order is None:
        return view
    sizes = [tensor.shape[d] for d in order]
    k = order.index(0 if grouping == "output_channel" else 1)
    return GroupView(math.prod(sizes[:k]), sizes[k], math.prod(sizes[k + 1:]))


def num_groups(shape: torch.Size | tuple[int, ...], grouping: str) -> int:
    view = group_view(shape, grouping)
    return 0 if view is None else view.groups


def norm_dims(ndim: int, grouping: str) -> tuple[int, ...]:
    """Dims a group norm reduces over, for layout-agnostic (e.g. channels_last) torch code."""
    if grouping in ("input_channel", "coupled"):
        return (0,) + tuple(range(2, ndim))
    if grouping == "output_channel":
        return tuple(range(1, ndim))
    raise ValueError(f"grouping {grouping!r} has no group norm")


def group_norms(tensor: torch.Tensor, grouping: str, keepdim: bool = False) -> torch.Tensor:
    """fp32 (fp64 for fp64 tensors) L2 norm of each group; for elementwise, |x|.

    With ``keepdim`` the result broadcasts against ``tensor`` (one value per group);
    without it, it is flat, one value per group in group order.
    """
    acc = state_dtype(tensor.dtype)
    tensor = tensor.detach()
    if grouping == "elementwise":
        norms = tensor.abs().to(acc)
    else:
        norms = torch.linalg.vector_norm(
            tensor, dim=norm_dims(tensor.ndim, grouping), keepdim=True, dtype=acc
        )
    return norms if keepdim else norms.flatten()


def zero_group_mask(tensor: torch.Tensor, grouping: str) -> torch.Tensor:
    """One bool per group of ``tensor`` itself (e.g. W): is every entry exactly zero."""
    if grouping == "none":
        raise ValueError("grouping 'none' has no groups")
    nonzero = tensor.detach() != 0
    if grouping == "elementwise":
        return ~nonzero.flatten()
    # exact test, not norm == 0: a norm of tiny entries can underflow to zero
    return ~nonzero.any(dim=norm_dims(tensor.ndim, grouping))


def group_prox_(z: torch.Tensor, tau: torch.Tensor | float, grouping: str) -> torch.Tensor:
    """Group soft-threshold z in place with threshold ``tau * sqrt(|G|)``.

    Returns one bool per group: which groups of z ended exactly zero (a group whose norm is
    not finite is never recorded as zero). For ``elementwise`` this is L1's
    ``sign(z) * max(|z| - tau, 0)`` (|G| = 1).
    """
    view = group_view(z.shape, grouping)
    norms = group_norms(z, grouping, keepdim=True)
    thr = tau * math.sqrt(view.group_size)
    keep = norms > thr
    # the where() also maps n == 0 to 0: the NaN of (n - thr) / n is never selected
    z.mul_(torch.where(keep, (norms - thr) / norms, 0.0))
    return (norms <= thr).flatten()

