"""The seam between the optimizer, the functional core and the backends.

A :class:`StepBatch` holds the aligned per-parameter tensors of one step (one entry per
parameter that has a gradient) and each parameter's group view; :class:`StepOptions` holds
what the whole batch shares. Every backend implements ``rmda_step_(batch, options)``.
This module imports nothing else of rmda_fused at run time, so any module may use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Hashable, Iterator, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # grouping imports this module (state_dtype)
    from .grouping import GroupView

__all__ = ["StepBatch", "StepOptions", "state_dtype"]


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype V, t and A are kept in for a parameter of ``param_dtype``
    (docs/algorithm.md, "Numerics"): fp64 for fp64 parameters, fp32 for every other."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StepOptions:
    """The hyper-parameters and AMP scalars one step shares across its batch.

    ``found_inf`` nonzero makes the step change nothing; ``maximize`` steps up the
    gradient."""

    lr: float | Tensor
    momentum: float
    lam: float
    grouping: str
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    maximize: bool = False

    @property
    def prox(self) -> bool:
        return self.grouping != "none"


@dataclass
class StepBatch:
    """Aligned lists, one entry per parameter: the tensors one RMDA step reads and writes.

    ``zero_masks[i]`` is the state's bool mask (one entry per group of z, written by the
    step) and ``views[i]`` the parameter's (outer, groups, inner) group view; both are None
    for ``grouping='none'``.
    """

    params: list[Tensor]
    grads: list[Tensor]
    initials: list[Tensor]
    duals: list[Tensor]
    steps: list[Tensor]
    alphas: list[Tensor]
    zero_masks: list[Tensor | None]
    views: list[GroupView | None]
    # the views as one flat list of (outer, groups, inner) triples, the C++ op's argument
    flat_views: list[int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.flat_views is None:
            self.flat_views = [n for view in self.views if view is not None for n in view]
        n = len(self.params)
        for name, values in zip(_FIELD_NAMES, self.lists()):
            if len(values) != n:
                raise ValueError(
                    f"StepBatch: {name} has {len(values)} entries, params has {n}: every "
                    f"list needs one entry per parameter")

    def __len__(self) -> int:
        return len(self.params)

    def lists(self) -> tuple[list, ...]:
        """The eight lists, in the order of the fields (and of the C++ op's arguments)."""
        return (self.params, self.grads, self.initials, self.duals, self.steps, self.alphas,
                self.zero_masks, self.views)

    def select(self, indices: Sequence[int]) -> StepBatch:
        """The sub-batch of the parameters at ``indices``, in that order."""
        return StepBatch(*([xs[i] for i in indices] for xs in self.lists()))

    def buckets(self) -> Iterator[tuple[tuple[torch.device, torch.dtype, ...], StepBatch]]:
        """Sub-batches sharing device and the dtypes of param, grad, initial and dual, in
        order of first appearance (the spirit of torch's
        ``_group_tensors_by_device_and_dtype``): what one multi-tensor launch can take."""
        return self._grouped_by([(p.device, p.dtype, g.dtype, w0.dtype, v.dtype) for p, g, w0, v
                                 in zip(self.params, self.grads, self.initials, self.duals)])

    def positions_by_device(self) -> list[tuple[torch.device, list[int]]]:
        """(device, positions of its entries), per device in order of first appearance."""
        indices: dict[torch.device, list[int]] = {}
        for i, p in enumerate(self.params):
            indices.setdefault(p.device, []).append(i)
        return list(indices.items())

    def _grouped_by(self, keys: list[Hashable]) -> Iterator[tuple[Hashable, StepBatch]]:
        """(key, sub-batch of the entries with that key), in order of first appearance;
        the batch itself when every entry shares one key (the usual case: no copies)."""
        indices: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            indices.setdefault(key, []).append(i)
        if len(indices) == 1:
            yield keys[0], self
            return
        for key, members in indices.items():
            yield key, self.select(members)

    def with_grads(self, grads: list[Tensor]) -> StepBatch:
        """This batch with other gradients (a step plan's batch, each step)."""
        return StepBatch(self.params, grads, self.initials, self.duals, self.steps,
                         self.alphas, self.zero_masks, self.views, self.flat_views)


_FIELD_NAMES = tuple(f.name for f in fields(StepBatch))  # the order of StepBatch.lists()
