"""Coupled channel groups: one group LASSO group over the input-channel slices of every dense
consumer of a channel (shared/SPEC.md, "Coupled channel groups"; docs/algorithm.md).

A param group with ``grouping="coupled"`` carries ``channel_groups``, aligned with its
``params``: None for a tensor with fewer than 2 dims (not regularized), else an int64 tensor
with the coupled group id of each input channel (column ``W[:, j, ...]``).
:func:`rmda_fused.param_groups` builds it from a model's channel dependencies
(:mod:`rmda_fused.coupling`). Columns that share an id, in one tensor or several, form one
group G; ``|G|`` counts the entries of all of them.

The tensors whose groups reach other tensors step as "partials -> reduce -> apply": each
backend's ``rmda_partials_`` advances t and A, updates V and sums z^2 per column; the reduce
here (torch ops, shared by every backend) sums the columns of each group and turns the norms
into a shrink factor and a zero flag per column; each backend's ``rmda_apply_`` writes W. The
reduce is the one place a sharded run adds its all-reduce: DTensor shards whose groups the
sharding cuts (rmda_fused/sharding.py) take the same three phases, with their groups'
columns or rows as :class:`Member` s. A tensor none of whose groups
reaches another tensor, with one column per group, is an ordinary input_channel tensor and
takes the single-kernel step (:func:`split_members`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .batch import StepBatch, StepOptions, state_dtype
from .grouping import norm_dims

__all__ = ["check_channel_groups", "check_members_step_together", "split_members", "Member",
           "coupled_entries", "coupled_members", "CoupledStep", "coupled_prox_",
           "coupled_zero_masks", "group_entries", "group_shape"]


def check_channel_groups(group: dict[str, Any], where: str) -> None:
    """Refuse a "coupled" param group whose ``channel_groups`` do not fit its parameters,
    naming the parameter and its shape."""
    if group["grouping"] != "coupled":
        return
    ids = group.get("channel_groups")
    params = group["params"]
    if not isinstance(ids, (list, tuple)) or len(ids) != len(params):
        raise ValueError(
            f"{where}: grouping 'coupled' needs 'channel_groups', a list with one entry per "
            f"parameter ({len(params)}), got {_describe(ids)}; build the param groups with "
            "rmda_fused.param_groups(model, lam, grouping='coupled', example_inputs=x)")
    for i, (p, entry) in enumerate(zip(params, ids)):
        name = f"{where}, parameter {i} (shape {tuple(p.shape)})"
        if p.dim() < 2:
            if entry is not None:
                raise ValueError(f"{name}: a tensor with fewer than 2 dims has no channels; "
                                 f"its channel_groups entry must be None, got {_describe(entry)}")
            continue
        if (not isinstance(entry, Tensor) or entry.dtype != torch.int64 or entry.dim() != 1
                or entry.numel() != p.shape[1]):
            raise ValueError(f"{name}: channel_groups entry must be an int64 tensor of "
                             f"{p.shape[1]} group ids (one per input channel), got "
                             f"{_describe(entry)}")
        if entry.numel() and int(entry.min()) < 0:
            raise ValueError(f"{name}: channel_groups ids must be >= 0, got {int(entry.min())}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if not isinstance(value, (list, tuple)) else f"{type(value).__name__} of {len(value)}"


def _column_entries(p: Tensor) -> int:
    """Entries of one input-channel column W[:, j, ...]."""
    return p.numel() // p.shape[1] if p.shape[1] else 0


def group_entries(params: Sequence[Tensor], ids: Sequence[Tensor], num_groups: int) -> Tensor:
    """|G| of every group: float64, the entries of all its member columns."""
    sizes = torch.zeros(num_groups, dtype=torch.float64)
    for p, col_ids in zip(params, ids):
        sizes.index_add_(0, col_ids, torch.full((col_ids.numel(),), float(_column_entries(p)),
                                                dtype=torch.float64))
    return sizes


class _Columns:
    """Every regularized column of a coupled param group: its group id and its tensor."""

    def __init__(self, group: dict[str, Any]) -> None:
        params, ids = group["params"], group["channel_groups"]
        self.params, self.ids = params, ids
        regularized = [i for i, p in enumerate(params) if p.dim() >= 2]
        empty = torch.zeros(0, dtype=torch.int64)
        self.all_ids = torch.cat([ids[i] for i in regularized]) if regularized else empty
        self.owner = torch.cat([torch.full((ids[i].numel(),), i, dtype=torch.int64)
                                for i in regularized]) if regularized else empty
        self.num_groups = int(self.all_ids.max()) + 1 if self.all_ids.numel() else 0
        self.columns = torch.bincount(self.all_ids, minlength=self.num_groups)
        pairs = torch.unique(self.all_ids * max(len(params), 1) + self.owner)
        self.tensors = torch.bincount(pairs // max(len(params), 1), minlength=self.num_groups)


def check_members_step_together(group: dict[str, Any], has_grad: Sequence[bool],
                                where: str) -> None:
    """Raise, naming two parameters, when a coupled group has a member with a gradient and
    one without: members of a group step together (same t and A)."""
    if group["grouping"] != "coupled":
        return
    cols = _Columns(group)
    if not cols.all_ids.numel():
        return
    with_grad = torch.tensor([bool(x) for x in has_grad])
    stepped = torch.zeros(cols.num_groups, dtype=torch.int64).index_add_(
        0, cols.all_ids, with_grad[cols.owner].long())
    torn = ((stepped > 0) & (stepped < cols.columns)).nonzero().flatten()
    if torn.numel():
        g = int(torn[0])
        members = cols.owner[cols.all_ids == g].unique().tolist()
        have = next(i for i in members if has_grad[i])
        lack = next(i for i in members if not has_grad[i])
        params = group["params"]
        raise ValueError(
            f"{where}: parameters {have} (shape {tuple(params[have].shape)}) and {lack} "
            f"(shape {tuple(params[lack].shape)}) share coupled group {g}, but only the first "
            "has a gradient: members of a coupled group step together")


def split_members(group: dict[str, Any], positions: list[int]) -> tuple[list[int], list[int]]:
    """(alone, crossing) among the regularized ``positions`` of a coupled param group: a
    tensor is alone when each of its groups is one of its own columns and nothing else (an
    input_channel tensor); the others share groups."""
    cols = _Columns(group)
    alone, crossing = [], []
    for i in positions:
        col_ids = cols.ids[i]
        single = bool((cols.tensors[col_ids] == 1).all()) and bool((cols.columns[col_ids] == 1).all())
        (alone if single else crossing).append(i)
    return alone, crossing


def shrink(norms: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """(factor max(n - thr, 0)/n, zero flag) of the group soft-threshold; n == 0 gives 0,
    never NaN, and a NaN norm is never recorded as zero."""
    keep = norms > thresholds
    scale = torch.where(keep, (norms - thresholds) / torch.where(keep, norms, 1.0), 0.0)
    return scale, norms <= thresholds


@dataclass(frozen=True)
class Member:
    """One tensor's share of a partials -> reduce -> apply step.

    ``entry`` is the step plan's row (position, p, g, W0, V, t, A, mask, view) of the tensor
    or, for a DTensor, of its local shard; ``grouping`` says which dim its groups index
    ("coupled"/"input_channel": columns, "output_channel": rows), and so the view its
    kernels walk. ``ids`` holds the reduce's group id of every group of the whole tensor,
    ``sizes`` each one's |G| (entries over all its members), ``local`` the groups the shard
    holds (all of them but for a DTensor sharded along the groups' dim)."""

    entry: tuple
    grouping: str
    ids: Tensor
    sizes: Tensor
    local: slice


def coupled_entries(group: dict[str, Any]) -> Tensor:
    """|G| of every coupled group of a coupled param group (float64, by group id)."""
    params, ids = group["params"], group["channel_groups"]
    regularized = [i for i, p in enumerate(params) if p.dim() >= 2]
    all_ids = [ids[i] for i in regularized]
    num_groups = int(torch.cat(all_ids).max()) + 1 if all_ids else 0
    return group_entries([params[i] for i in regularized], all_ids, num_groups)


def coupled_members(group: dict[str, Any], entries: list[tuple],
                    local_groups: Callable[[Tensor, str], slice]) -> list[Member]:
    """The members of a coupled param group's reduce, for the plan's ``entries``;
    ``local_groups(p, grouping)`` is the share of p's columns its shard holds."""
    params, ids = group["params"], group["channel_groups"]
    sizes = coupled_entries(group)
    return [Member(entry, "coupled", ids[entry[0]], sizes[ids[entry[0]]],
                   local_groups(params[entry[0]], "coupled")) for entry in entries]


@dataclass
class _Route:
    """One backend's share of a reduce step: its batch (gradients filled in per step), its
    groups' ids, and the buffers its kernels write."""

    name: str
    device: torch.device
    grouping: str                 # of its tensors' views (the reference backend's dims)
    template: StepBatch
    positions: list[int]          # in the param group
    groups: list[int]             # groups per local shard (partials, scales)
    mask_groups: list[int]        # groups per tensor (zero masks)
    ids: Tensor                   # group id of every local group, on the reduce's device
    mask_ids: Tensor              # group id of every group of the tensors, likewise
    tensor_of_group: Tensor       # route-local tensor index of every mask group, on `device`
    sqrt_entries: Tensor          # sqrt(|G|) of every mask group, on `device`
    local_index: Tensor | None    # the local groups among the mask groups (None: all)
    partials: Tensor              # flat, one entry per local group (views to the kernels)
    scales: Tensor


class CoupledStep:
    """The partials -> reduce -> apply step of the tensors whose groups reach beyond one
    tensor or one shard: a coupled param group's crossing tensors, and the DTensors whose
    groups the sharding cuts (rmda_fused/sharding.py); built once per step plan.
    ``route`` is :func:`rmda_fused.functional.route_batch`; ``all_reduce``, set for a
    sharded run, sums the group sums of z^2 across ranks before the norms are taken."""

    def __init__(self, members: list[Member], backend: str,
                 route: Callable[[StepBatch, str, str], list],
                 all_reduce: Callable[[Tensor], None] | None = None) -> None:
        dtypes = {state_dtype(m.entry[1].dtype) for m in members}
        if len(dtypes) > 1:
            raise TypeError("RMDA: the tensors of one coupled or sharded reduce must share a "
                            "state dtype (fp64 parameters cannot be reduced with others)")
        self.dtype = dtypes.pop()
        self.all_reduce = all_reduce
        # the ids these tensors use, renumbered 0..n-1 (the same on every rank)
        used, inverse = torch.unique(torch.cat([m.ids for m in members]), return_inverse=True)
        self.num_groups = used.numel()
        mask_ids = inverse.split([m.ids.numel() for m in members])
        self.device = members[0].entry[1].device
        self.routes: list[_Route] = []
        by_grouping: dict[str, list[int]] = {}
        for k, m in enumerate(members):
            by_grouping.setdefault(m.grouping, []).append(k)
        for grouping, ks in by_grouping.items():
            batch = StepBatch(*map(list, zip(*(members[k].entry[1:] for k in ks))))
            for device, name, picked in route(batch, grouping, backend):
                self.routes.append(self._route(name, device, grouping, batch.select(picked),
                                               [members[ks[j]] for j in picked],
                                               [mask_ids[ks[j]] for j in picked]))

    def _route(self, name: str, device: torch.device, grouping: str, batch: StepBatch,
               members: list[Member], mask_ids: list[Tensor]) -> _Route:
        mask_groups = [ids.numel() for ids in mask_ids]
        local_ids = [ids[m.local] for ids, m in zip(mask_ids, members)]
        groups = [ids.numel() for ids in local_ids]
        owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(mask_groups))
        local_index = None
        if groups != mask_groups:
            starts = torch.tensor([0] + mask_groups).cumsum(0)
            local_index = torch.cat([torch.arange(start, start + n)[m.local] for start, n, m
                                     in zip(starts.tolist(), mask_groups, members)]).to(device)
        n = sum(groups)
        return _Route(
            name, device, grouping, batch, [m.entry[0] for m in members], groups, mask_groups,
            torch.cat(local_ids).to(self.device), torch.cat(mask_ids).to(self.device),
            owner.to(device),
            torch.cat([m.sizes for m in members]).sqrt().to(device=device, dtype=self.dtype),
            local_index, torch.zeros(n, dtype=self.dtype, device=device),
            torch.zeros(n, dtype=self.dtype, device=device))

    def run(self, group: dict[str, Any], grads: list[Tensor | None], options: StepOptions,
            run_phase: Callable[..., None]) -> None:
        """One step: partials on every route, the reduce, apply on every route.
        ``run_phase(phase, name, device, batch, options, buffers)`` runs a backend's
        ``rmda_partials_``/``rmda_apply_`` (rmda_fused.functional.run_coupled_phase)."""
        batches = []
        for r in self.routes:
            batch = r.template.with_grads([grads[i] for i in r.positions])
            batches.append(batch)
            run_phase("rmda_partials_", r.name, r.device, batch,
                      dataclasses.replace(options, grouping=r.grouping),
                      list(r.partials.split(r.groups)))
        totals = torch.zeros(self.num_groups, dtype=self.dtype, device=self.device)
        for r in self.routes:
            totals.index_add_(0, r.ids, r.partials.to(self.device))
        if self.all_reduce is not None:
            self.all_reduce(totals)
        norms = totals.sqrt_()
        found_inf = options.found_inf
        for r, batch in zip(self.routes, batches):
            steps, alphas = torch.stack(batch.steps), torch.stack(batch.alphas)
            taus = alphas.div_(steps.sqrt_()).mul_(float(options.lam))  # lam * A / beta
            thresholds = taus.index_select(0, r.tensor_of_group).mul_(r.sqrt_entries)
            scale, zero = shrink(norms.index_select(0, r.mask_ids).to(r.device), thresholds)
            r.scales.copy_(scale if r.local_index is None else scale[r.local_index])
            masks = batch.zero_masks
            if found_inf is not None:  # a skipped step keeps the last masks
                skip = found_inf.reshape(()).to(r.device) != 0
                zero = torch.where(skip, torch.cat(masks), zero)
            torch._foreach_copy_(masks, list(zero.split(r.mask_groups)))
            run_phase("rmda_apply_", r.name, r.device, batch,
                      dataclasses.replace(options, grouping=r.grouping),
                      list(r.scales.split(r.groups)))


def coupled_prox_(zs: Sequence[Tensor], ids: Sequence[Tensor], taus: Sequence[Tensor | float],
                  entries: Tensor | None = None, groupings: Sequence[str] | None = None,
                  all_reduce: Callable[[Tensor], None] | None = None) -> list[Tensor]:
    """The prox of coupled groups, in place on the pre-prox points ``zs`` (one per member
    tensor, in their state dtype), with ``ids`` their columns' group ids and ``taus`` each
    tensor's lam*A/beta. ``entries``: |G| per group (default: from these tensors).
    ``groupings`` (default all "coupled") says per tensor whether its groups are columns or
    rows ("output_channel"), and ``all_reduce`` sums the group sums of z^2 across ranks
    when the ``zs`` are shards (rmda_fused/sharding.py). Returns each tensor's per-group
    zero flags. Plain torch ops, for prox points and ProxSGD (which shrinks its parameters
    themselves); the optimizer's step uses the kernels' partials instead."""
    if not zs:
        return []
    groupings = groupings or ["coupled"] * len(zs)
    device, dtype = zs[0].device, state_dtype(zs[0].dtype)
    if entries is None:
        all_ids = torch.cat([x.reshape(-1) for x in ids])
        entries = group_entries(zs, ids, int(all_ids.max()) + 1 if all_ids.numel() else 0)
    num_groups = entries.numel()
    totals = torch.zeros(num_groups, dtype=dtype, device=device)
    on_device = [x.to(device) for x in ids]
    for z, col_ids, grouping in zip(zs, on_device, groupings):
        totals.index_add_(0, col_ids, _group_sumsq(z, grouping).to(dtype))
    if all_reduce is not None:
        all_reduce(totals)
    norms = totals.sqrt()
    sqrt_entries = entries.to(device=device, dtype=dtype).sqrt()
    masks = []
    for z, col_ids, tau, grouping in zip(zs, on_device, taus, groupings):
        scale, zero = shrink(norms[col_ids], tau * sqrt_entries[col_ids])
        z.mul_(scale.reshape(group_shape(z.dim(), grouping)).to(z.dtype))
        masks.append(zero)
    return masks


def group_shape(ndim: int, grouping: str) -> tuple[int, ...]:
    """The shape that broadcasts one value per column (or per row, for output_channel)
    against a tensor of ``ndim`` dims."""
    if grouping == "output_channel":
        return (-1,) + (1,) * (ndim - 1)
    return (1, -1) + (1,) * (ndim - 2)


def _group_sumsq(z: Tensor, grouping: str) -> Tensor:
    return z.square().sum(dim=norm_dims(z.dim(), grouping), dtype=state_dtype(z.dtype))


def coupled_zero_masks(column_masks: Sequence[Tensor], ids: Sequence[Tensor]) -> Tensor:
    """One bool per coupled group (group id order) from the members' per-column masks (the
    state's ``zero_mask``): a group is zero when its columns are."""
    if not column_masks:
        return torch.zeros(0, dtype=torch.bool)
    device = column_masks[0].device
    flags = torch.cat([m.to(device) for m in column_masks])
    all_ids = torch.cat(list(ids)).to(device)
    num_groups = int(all_ids.max()) + 1 if all_ids.numel() else 0
    nonzero = torch.zeros(num_groups, dtype=torch.int64, device=device)
    nonzero.index_add_(0, all_ids, (~flags).long())
    present = torch.zeros(num_groups, dtype=torch.bool, device=device)
    present[all_ids] = True
    return (nonzero == 0)[present]

