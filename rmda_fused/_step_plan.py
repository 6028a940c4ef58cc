"""A param group's step, planned once and replayed while nothing it depends on changes.

Building a step touches every parameter several times in Python: its grouping and memory
view, its state, the fused kernels' layout checks, the split by device and backend. None of
that changes from one step to the next in training, so :class:`GroupPlan` does it once and
keeps the routed batches (:func:`rmda_fused.functional.route_batch`) with everything but
the gradients filled in. Each step then only checks, per parameter, that the gradients are
the ones the plan was built for: present for the same parameters, with the same dtype,
device, shape and strides. Anything else (a new grouping or backend, a gradient of another
layout, a sparse one) builds a new plan through the optimizer's full checks; the optimizer
drops its plans whenever it replaces state tensors (a load, t moved to its device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import functional
from .batch import StepBatch, StepOptions
from .coupled import CoupledStep, split_members
from .grouping import effective_grouping, memory_group_view
from .structure import MASK_KEY

if TYPE_CHECKING:
    from .optimizer import RMDA


class GroupPlan:
    """The routed step batches of one param group, for one set of gradient layouts."""

    def __init__(self, optimizer: RMDA, group: dict[str, Any], grads: list[Tensor | None]):
        params = group["params"]
        self.params = list(params)
        self.has_grad = tuple(g is not None for g in grads)
        self.grouping, self.backend = group["grouping"], group["backend"]
        self.channel_groups = group.get("channel_groups")
        present = [i for i, g in enumerate(grads) if g is not None]
        self.signatures = self._signatures(grads)
        self.state = optimizer.state
        rows: dict[str, list[tuple]] = {}
        for i in present:
            p = params[i]
            grouping = effective_grouping(p.shape, self.grouping)
            view = memory_group_view(p, grouping)  # what the kernels walk; same group count
            state = optimizer._state_for(p, grouping, view)
            rows.setdefault(grouping, []).append(
                (i, p, grads[i], state["initial"], state["dual"], state["step"],
                 state["alpha"], state.get(MASK_KEY), view))
        # coupled tensors whose groups reach no other tensor step as input_channel ones
        self.coupled: CoupledStep | None = None
        if "coupled" in rows:
            entries = rows.pop("coupled")
            by_position = {entry[0]: entry for entry in entries}
            alone, crossing = split_members(group, list(by_position))
            if alone:
                rows.setdefault("input_channel", []).extend(by_position[i] for i in alone)
            if crossing:
                self.coupled = CoupledStep(group, [by_position[i] for i in crossing],
                                           self.backend, functional.route_batch)
        # (grouping, device, backend name, batch without its gradients, their positions)
        self.routes: list[tuple[str, torch.device, str, StepBatch, list[int]]] = []
        for grouping, entries in rows.items():
            positions = [entry[0] for entry in entries]
            batch = StepBatch(*map(list, zip(*(entry[1:] for entry in entries))))
            for device, name, picked in functional.route_batch(batch, grouping, self.backend):
                self.routes.append((grouping, device, name, batch.select(picked),
                                    [positions[k] for k in picked]))

    @staticmethod
    def _signatures(grads: list[Tensor | None]) -> list[tuple]:
        return [(g.dtype, g.device, g.shape, g.stride()) for g in grads if g is not None]

    def matches(self, state: dict, group: dict[str, Any], grads: list[Tensor | None]) -> bool:
        """Whether this plan still describes the group's step with these gradients."""
        if (state is not self.state or group["grouping"] != self.grouping
                or group["backend"] != self.backend or len(grads) != len(self.has_grad)
                or group.get("channel_groups") is not self.channel_groups
                or tuple(g is not None for g in grads) != self.has_grad
                or any(p is not q for p, q in zip(group["params"], self.params))):
            return False
        try:
            return self._signatures(grads) == self.signatures
        except RuntimeError:  # a sparse gradient has no strides: the full checks name it
            return False

    def run(self, group: dict[str, Any], grads: list[Tensor | None],
            grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Every route's kernels (resolved and split when the plan was built)."""
        for grouping, device, name, template, positions in self.routes:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], grouping,
                                  grad_scale, found_inf, group["maximize"])
            batch = template.with_grads([grads[i] for i in positions])
            functional.run_route(name, device, batch, options)
        if self.coupled is not None:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], "coupled",
                                  grad_scale, found_inf, group["maximize"])
            self.coupled.run(group, grads, options, functional.run_coupled_phase)
