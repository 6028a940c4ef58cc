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

from . import functional, sharding
from .batch import StepBatch, StepOptions
from .coupled import CoupledStep, Member, coupled_members, split_members
from .grouping import effective_grouping, group_view, memory_group_view
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
        # DTensor parameters step on their local shards (rmda_fused/sharding.py)
        self.sharded = [p for p in params if sharding.is_sharded(p)]
        self.shard_pointers = self._shard_pointers()
        rows: dict[str, list[tuple]] = {}
        cut: list[tuple] = []  # DTensors whose groups their sharding cuts
        for i in present:
            p = params[i]
            grouping = effective_grouping(p.shape, self.grouping)
            state = optimizer._state_for(p, grouping, group_view(p.shape, grouping))
            shard = sharding.local(p)
            mask = state.get(MASK_KEY)
            # the view the kernels walk; the same group count as the tensor's own view
            row = (i, shard, sharding.local(grads[i]), sharding.local(state["initial"]),
                   sharding.local(state["dual"]), state["step"], state["alpha"],
                   None if mask is None else sharding.local(mask).view(-1),
                   memory_group_view(shard, grouping))
            if sharding.cuts(p, grouping) and grouping != "coupled":
                cut.append((row, grouping))
            else:
                rows.setdefault(grouping, []).append(row)
        members: list[Member] = []
        if "coupled" in rows:
            entries = rows.pop("coupled")
            by_position = {entry[0]: entry for entry in entries}
            # coupled tensors whose groups reach no other tensor step as input_channel ones,
            # unless their shards lie on several ranks
            alone, crossing = split_members(group, [i for i in by_position
                                                    if not sharding.is_sharded(params[i])])
            if alone:
                rows.setdefault("input_channel", []).extend(by_position[i] for i in alone)
            members = coupled_members(group, [entry for i, entry in by_position.items()
                                              if i not in alone], sharding.local_groups)
        members += self._cut_members(cut)
        self.coupled: CoupledStep | None = None
        if members:
            cut_params = [params[m.entry[0]] for m in members
                          if sharding.is_sharded(params[m.entry[0]])]
            all_reduce = None
            if cut_params:
                process_group = sharding.reduce_group(cut_params, "RMDA: a param group")
                all_reduce = sharding.sum_across(process_group, "the group sums of z^2")
            self.coupled = CoupledStep(members, self.backend, functional.route_batch,
                                       all_reduce)
        # (grouping, device, backend name, batch without its gradients, their positions)
        self.routes: list[tuple[str, torch.device, str, StepBatch, list[int]]] = []
        for grouping, entries in rows.items():
            positions = [entry[0] for entry in entries]
            batch = StepBatch(*map(list, zip(*(entry[1:] for entry in entries))))
            for device, name, picked in functional.route_batch(batch, grouping, self.backend):
                self.routes.append((grouping, device, name, batch.select(picked),
                                    [positions[k] for k in picked]))

    def _cut_members(self, cut: list[tuple]) -> list[Member]:
        """The reduce members of tensors whose groups their sharding cuts."""
        tensors = [(self.params[row[0]], grouping) for row, grouping in cut]
        return [Member(row, grouping, ids, sizes, sharding.local_groups(p, grouping))
                for (row, grouping), (p, _), (ids, sizes)
                in zip(cut, tensors, sharding.cut_groups(tensors))]

    def _shard_pointers(self) -> list[int]:
        return [p.to_local().data_ptr() for p in self.sharded]

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
        if self.sharded and self._shard_pointers() != self.shard_pointers:
            return False  # a DTensor's local shard was replaced (e.g. FSDP2 re-sharding)
        try:
            return self._signatures(grads) == self.signatures
        except RuntimeError:  # a sparse gradient has no strides: the full checks name it
            return False

    def run(self, group: dict[str, Any], grads: list[Tensor | None],
            grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Every route's kernels (resolved and split when the plan was built)."""
        if self.sharded:
            grads = [sharding.local(g) for g in grads]
        for grouping, device, name, template, positions in self.routes:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], grouping,
                                  grad_scale, found_inf, group["maximize"])
            batch = template.with_grads([grads[i] for i in positions])
            functional.run_route(name, device, batch, options)
        if self.coupled is not None:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], "coupled",
                                  grad_scale, found_inf, group["maximize"])
            self.coupled.run(group, grads, options, functional.run_coupled_phase)
