"""What users watch: group sparsity of W and of the prox point z, and structure identification.

RMDA's theorem is about z (the paper's W-tilde): its zero pattern stops changing after
finitely many steps. Every step records z's zero groups in ``optimizer.state[p]["zero_mask"]``
on the device; the functions here only read those masks (no extra pass over the weights) and
touch the host only when a report is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .coupled import coupled_zero_masks, group_entries
from .grouping import effective_grouping, group_view
from .sharding import full, merge_masks, unwrap, zero_groups_of

# the state key of z's zero mask, in RMDA and ProxSGD; state dicts saved before it was
# renamed hold it as "zero_groups"
MASK_KEY = "zero_mask"
_OLD_MASK_KEY = "zero_groups"


def with_current_mask_key(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict with the zero mask under :data:`MASK_KEY` (a shallow copy;
    older state dicts keep loading)."""
    state = {pid: {MASK_KEY if key == _OLD_MASK_KEY else key: value
                   for key, value in entry.items()}
             for pid, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


@dataclass(frozen=True)
class TensorSparsity:
    """The groups of one regularized tensor, or (``grouping="coupled"``) every coupled group
    of one param group, whose members span tensors (``shape`` is then empty and
    ``group_size`` the mean entries per group)."""

    name: str
    shape: tuple[int, ...]
    grouping: str
    groups: int
    zero_count: int
    group_size: int
    entries: int | None = None  # entries of all groups, when they differ in size
    zero_entries: int | None = None  # entries of the zero groups, likewise

    @property
    def fraction(self) -> float:
        """Fraction of these groups that are exactly zero."""
        return self.zero_count / self.groups if self.groups else 0.0

    @property
    def total_entries(self) -> int:
        return self.groups * self.group_size if self.entries is None else self.entries

    @property
    def zero_total_entries(self) -> int:
        return self.zero_count * self.group_size if self.zero_entries is None else self.zero_entries


@dataclass(frozen=True)
class SparsityReport:
    of: str  # "z" or "W"
    tensors: list[TensorSparsity] = field(default_factory=list)

    @property
    def groups(self) -> int:
        return sum(t.groups for t in self.tensors)

    @property
    def zero_count(self) -> int:
        return sum(t.zero_count for t in self.tensors)

    @property
    def fraction(self) -> float:
        """Model-wide fraction of groups that are exactly zero (each group counts once)."""
        return self.zero_count / self.groups if self.groups else 0.0

    @property
    def weighted_fraction(self) -> float:
        """Model-wide fraction of regularized entries that lie in a zero group."""
        total = sum(t.total_entries for t in self.tensors)
        zero = sum(t.zero_total_entries for t in self.tensors)
        return zero / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"group sparsity of {self.of}: {self.zero_count}/{self.groups} groups "
                 f"({self.fraction:.1%}), {self.weighted_fraction:.1%} of entries"]
        lines += [f"  {t.name:<40} {str(t.shape or t.grouping):<20} {t.zero_count:>6}/"
                  f"{t.groups:<6} {t.fraction:6.1%}" for t in self.tensors]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Unit:
    """What one report entry covers: a regularized tensor, or a coupled param group's
    members (``params``, with their column ids)."""

    params: list[Tensor]
    grouping: str
    ids: list[Tensor] | None = None
    index: int = 0  # of the param group, for a coupled unit's name


def _units(optimizer: torch.optim.Optimizer) -> Iterator[_Unit]:
    for index, group in enumerate(optimizer.param_groups):
        members = []
        for i, p in enumerate(group["params"]):
            grouping = effective_grouping(p.shape, group.get("grouping", "none"))
            if grouping == "coupled":
                members.append((p, group["channel_groups"][i]))
            elif grouping != "none":
                yield _Unit([p], grouping)
        if members:
            yield _Unit([p for p, _ in members], "coupled", [ids for _, ids in members], index)


def _column_mask(state_of: dict, p: Tensor, grouping: str, of: str) -> Tensor:
    state = state_of.get(p, {})
    if of == "z" and MASK_KEY in state:
        return full(state[MASK_KEY]).reshape(-1)  # a DTensor's: gathered
    if of == "z":  # no step yet: z is undefined, report no zero group
        return torch.zeros(group_view(p.shape, grouping).groups, dtype=torch.bool, device=p.device)
    return zero_groups_of(p, grouping)


def _unit_mask(state_of: dict, unit: _Unit, of: str) -> Tensor:
    """One bool per group of the unit (for a coupled unit, per coupled group in id order)."""
    if of not in ("z", "W"):
        raise ValueError(f"of must be 'z' or 'W', got {of!r}")
    masks = [_column_mask(state_of, p, unit.grouping, of) for p in unit.params]
    return masks[0] if unit.ids is None else coupled_zero_masks(masks, unit.ids)


def _zero_masks(optimizer: Any, of: str) -> tuple[list[_Unit], list[Tensor]]:
    """The report entries of ``optimizer`` and one bool mask each, model-wide: z's from
    the state, or W's computed now. Through a wrapper that shards the optimizer
    (ZeroRedundancyOptimizer's ``.optim``), each rank holds the state of its parameters
    only: their masks are merged across ranks (a collective: every rank calls this)."""
    inner, process_group = unwrap(optimizer)
    units = list(_units(optimizer))
    masks = [_unit_mask(inner.state, unit, of) for unit in units]
    if process_group is not None and of == "z":
        masks = merge_masks(masks, process_group)
    return units, masks


def group_sparsity(
    optimizer: torch.optim.Optimizer, of: str = "z", model: nn.Module | None = None
) -> SparsityReport:
    """Per-tensor and model-wide group sparsity of z (default) or of W; a coupled param
    group is one entry with one group per coupled group.

    ``model`` only names the tensors in the report. One host sync for the whole report.
    ``optimizer`` may be a wrapper exposing ``.optim`` (ZeroRedundancyOptimizer) and hold
    DTensors: the report is then model-wide, gathered across ranks, and every rank calls
    this.
    """
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    units, masks = _zero_masks(optimizer, of)
    counts = (torch.stack([m.sum() for m in masks]).tolist() if masks else [])
    tensors = []
    for i, (unit, mask, count) in enumerate(zip(units, masks, counts)):
        if unit.ids is None:
            p = unit.params[0]
            view = group_view(p.shape, unit.grouping)
            tensors.append(TensorSparsity(
                name=names.get(id(p), f"param {i}"), shape=tuple(p.shape),
                grouping=unit.grouping, groups=view.groups, zero_count=int(count),
                group_size=view.group_size))
            continue
        all_ids = torch.cat(unit.ids)
        present = torch.unique(all_ids)
        sizes = group_entries(unit.params, unit.ids, int(present.max()) + 1 if present.numel() else 0)[present]
        entries, zero_entries = int(sizes.sum()), int(sizes[mask.cpu()].sum())
        tensors.append(TensorSparsity(
            name=f"coupled groups of param group {unit.index}", shape=(), grouping="coupled",
            groups=present.numel(), zero_count=int(count),
            group_size=entries // max(present.numel(), 1), entries=entries,
            zero_entries=zero_entries))
    return SparsityReport(of=of, tensors=tensors)


class IdentificationTracker:
    """Tracks when the zero pattern of z last changed.

    Call :meth:`update` after ``optimizer.step()`` (per step) or at the end of each epoch,
    with that step's or epoch's index. The comparison stays on the device; :attr:`last_change`
    and :attr:`flips` sync with the host when read. The pattern before the first update is
    "no group zero" (a dense start), so the first zero group counts as a change.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._previous: Tensor | None = None
        self._last_change: Tensor | None = None
        self._flips: list[Tensor] = []
        self.indices: list[int] = []

    def _pattern(self) -> Tensor | None:
        _, masks = _zero_masks(self.optimizer, "z")
        if not masks:
            return None
        device = masks[0].device
        return torch.cat([m.to(device) for m in masks])

    def update(self, index: int) -> None:
        pattern = self._pattern()
        if pattern is None:
            return
        previous = self._previous
        if previous is None or previous.shape != pattern.shape:
            previous = torch.zeros_like(pattern)
        flips = (pattern != previous).sum()
        here = torch.tensor(index, device=pattern.device)
        if self._last_change is None:
            self._last_change = torch.full((), -1, device=pattern.device, dtype=here.dtype)
        self._last_change = torch.where(flips > 0, here, self._last_change)
        self._previous = pattern.clone()
        self._flips.append(flips)
        self.indices.append(index)

    @property
    def last_change(self) -> int | None:
        """Index of the last update at which z's zero pattern changed (None: never)."""
        if self._last_change is None:
            return None
        value = int(self._last_change)
        return None if value < 0 else value

    @property
    def flips(self) -> list[int]:
        """Number of groups whose zero/non-zero status changed, per update."""
        return torch.stack(self._flips).tolist() if self._flips else []

    def state_dict(self) -> dict:
        return {"previous": self._previous, "last_change": self._last_change,
                "flips": self.flips, "indices": list(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        self._previous = state["previous"]
        self._last_change = state["last_change"]
        device = self._previous.device if self._previous is not None else "cpu"
        self._flips = [torch.tensor(f, device=device) for f in state["flips"]]
        self.indices = list(state["indices"])
