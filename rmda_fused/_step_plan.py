"""A param group's step, planned once and replayed while nothing it depends on changes.

Building a step touches every parameter several times in Python: its grouping and memory
view, its state, the fused kernels' layout checks, the split by device and backend. None of
that changes from one step to the next in training, so :class:`GroupPlan` does it once and
keeps the routed batches (:func:`rmda_fused.functional.route_batch`) with everything but
the gradients filled in. Each step then only checks that the group holds the same
parameters and that their gradients are the ones the plan was built for: present for the
same parameters, with the same dtype, device, shape and strides. Anything else (a new
grouping or backend, a gradient of another layout, a sparse one) builds a new plan through
the optimizer's full checks; the optimizer drops its plans whenever it replaces state
tensors (a load, t moved to its device).

The replay costs no Python per tensor where the C++ extension is loaded: the gradient check
is its ``GradWatch`` and the cpu and cuda backends' routes are its ``PlannedStep``
(csrc/step_plan.cpp), which hold their tensors and call the kernels themselves. Routes of
the other backends, coupled groups, DTensor parameters and steps that torch.compile traces
take the gradients as a list.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _extension, functional, sharding
from .batch import StepBatch, StepOptions
from .coupled import CoupledStep, Member, coupled_members, split_members
from .grouping import effective_grouping, group_view, memory_group_view
from .structure import MASK_KEY

if TYPE_CHECKING:
    from .optimizer import RMDA


class GroupPlan:
    """The routed step batches of one param group, for one set of gradient layouts."""

    def __init__(self, optimizer: RMDA, group: dict[str, Any]):
        params = group["params"]
        self.params = list(params)
        self.single = [(i, p) for i, p in enumerate(self.params) if p.numel() == 1]
        self.grouping, self.backend = group["grouping"], group["backend"]
        self.channel_groups = group.get("channel_groups")
        self.state = optimizer.state
        # DTensor parameters step on their local shards (rmda_fused/sharding.py)
        self.sharded = [p for p in params if sharding.is_sharded(p)]
        self.shard_pointers = self._shard_pointers()
        # torch.compile traces Python, not the extension's objects: a traced step lists
        self.traced = torch.compiler.is_compiling()
        self.watch = grad_watch(self.params, listed=bool(self.sharded) or self.traced)
        self.native = not isinstance(self.watch, ListedGrads)  # csrc/step_plan.cpp's
        grads = self.grads()
        present = [i for i, g in enumerate(grads) if g is not None]
        self.devices = list(dict.fromkeys(grads[i].device for i in present))
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
        # (grouping, device, backend name, batch without its gradients, their positions,
        # the backend's planned step of it or None)
        self.routes: list[tuple[str, torch.device, str, StepBatch, list[int], Any]] = []
        for grouping, entries in rows.items():
            positions = [entry[0] for entry in entries]
            batch = StepBatch(*map(list, zip(*(entry[1:] for entry in entries))))
            for device, name, picked in functional.route_batch(batch, grouping, self.backend):
                routed, at = batch.select(picked), [positions[k] for k in picked]
                planned = (functional.planned_step(name, routed, grouping, self.watch, at)
                           if self.native else None)
                self.routes.append((grouping, device, name, routed, at, planned))

    def _cut_members(self, cut: list[tuple]) -> list[Member]:
        """The reduce members of tensors whose groups their sharding cuts."""
        tensors = [(self.params[row[0]], grouping) for row, grouping in cut]
        return [Member(row, grouping, ids, sizes, sharding.local_groups(p, grouping))
                for (row, grouping), (p, _), (ids, sizes)
                in zip(cut, tensors, sharding.cut_groups(tensors))]

    def _shard_pointers(self) -> list[int]:
        return [p.to_local().data_ptr() for p in self.sharded]

    def matches(self, state: dict, group: dict[str, Any]) -> bool:
        """Whether this plan still describes the group's step, with the gradients the
        parameters hold now (which the plan then uses)."""
        params = group["params"]
        if (state is not self.state or torch.compiler.is_compiling() != self.traced
                or group["grouping"] != self.grouping
                or group["backend"] != self.backend
                or group.get("channel_groups") is not self.channel_groups
                or not self._holds(params)):
            return False
        if self.sharded and self._shard_pointers() != self.shard_pointers:
            return False  # a DTensor's local shard was replaced (e.g. FSDP2 re-sharding)
        return self.watch.refresh()

    def _holds(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are this plan's parameters, in order, at the speed of a list
        compare: it tests each pair for identity and calls Tensor.__eq__ only on a pair that
        is not identical, which then raises (a mismatch) unless both hold one element; so
        the one-element parameters are also tested for identity."""
        if self.traced:  # torch.compile compares list elements by value
            return (len(params) == len(self.params)
                    and all(p is q for p, q in zip(params, self.params)))
        try:
            if params != self.params:
                return False
        except Exception:  # an element compared with a tensor that is not its own
            return False
        return all(params[i] is p for i, p in self.single)

    def grads(self) -> list[Tensor | None]:
        """The gradients of the last check, one entry per parameter (None: it has none)."""
        return self.watch.grads()

    def run(self, group: dict[str, Any], grad_scale: Tensor | None,
            found_inf: Tensor | None) -> None:
        """Every route's kernels (resolved and split when the plan was built)."""
        grads = None  # listed only for the routes that take lists
        for grouping, device, name, template, positions, planned in self.routes:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], grouping,
                                  grad_scale, found_inf, group["maximize"])
            if planned is not None:
                functional.run_planned(name, device, planned, options)
                continue
            grads = grads or self.local_grads()
            functional.run_route(name, device, template.with_grads([grads[i] for i in positions]),
                                 options)
        if self.coupled is not None:
            options = StepOptions(group["lr"], group["momentum"], group["lam"], "coupled",
                                  grad_scale, found_inf, group["maximize"])
            self.coupled.run(group, grads or self.local_grads(), options,
                             functional.run_coupled_phase)

    def local_grads(self) -> list[Tensor | None]:
        """:meth:`grads`, a DTensor's as its local shard (what the kernels take)."""
        grads = self.grads()
        return [sharding.local(g) for g in grads] if self.sharded else grads


class ListedGrads:
    """The gradient check of a plan in Python, where csrc/step_plan.cpp's ``GradWatch``
    cannot serve: without the C++ extension, for DTensor parameters and in steps that
    torch.compile traces."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self._grads = [p.grad for p in params]
        self.layouts = self._layouts(self._grads)

    @staticmethod
    def _layouts(grads: list[Tensor | None]) -> list[tuple | None]:
        return [None if g is None else (g.dtype, g.device, g.shape, g.stride()) for g in grads]

    def refresh(self) -> bool:
        grads = [p.grad for p in self.params]
        try:
            if self._layouts(grads) != self.layouts:
                return False
        except RuntimeError:  # a sparse gradient has no strides: the full checks name it
            return False
        self._grads = grads
        return True

    def grads(self) -> list[Tensor | None]:
        return self._grads


def grad_watch(params: list[Tensor], listed: bool):
    """The gradient check of a plan over ``params``, recording the gradients they hold now:
    the extension's ``GradWatch`` where it is loaded (unless ``listed``), else
    :class:`ListedGrads`."""
    if listed or _extension.load_error() is not None:
        return ListedGrads(params)
    return torch.classes.rmda_fused.GradWatch(params)
