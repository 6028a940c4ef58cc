"""Sharded training: parameters that are DTensors (FSDP2's ``fully_shard``, or DTensors
placed by hand on a 1-D device mesh), and optimizer wrappers that shard the optimizer
(``torch.distributed.optim.ZeroRedundancyOptimizer``, or any wrapper exposing ``.optim``);
shared/SPEC.md, "Sharded parameters".

For a DTensor parameter, RMDA keeps W0 and V as DTensors with the parameter's placement and
t and A as plain 0-d tensors, the same on every rank; the kernels run on the local shards.
A group that lies whole on one rank (input_channel groups under Shard(1), output_channel
under Shard(0), elementwise, none) takes the ordinary single-kernel step there, and its
zero mask is a DTensor sharded like the groups. A group the sharding cuts (input_channel
under Shard(0), output_channel under Shard(1), every coupled group) takes the partials ->
reduce -> apply step of :mod:`rmda_fused.coupled`, whose group sums of z^2 are summed across
ranks by one all-reduce per param group and step; every rank then holds the same norms, and
the whole zero mask of such a tensor as a plain (replicated) tensor. The gradients' NaN/inf
flag is all-reduced (max) too, so that every rank skips the same steps.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from .grouping import group_view, zero_group_mask

__all__ = ["is_sharded", "local", "check_placement", "cuts", "local_groups", "cut_groups",
           "fit_zero_mask", "like", "laid_out_like", "full", "reduce_group", "sum_across",
           "agree_on_flag", "zero_groups_of", "unwrap", "merge_masks", "apply_prox_point"]

# the dim a grouping's groups index (elementwise groups are single entries: never cut)
_GROUP_DIM = {"input_channel": 1, "coupled": 1, "output_channel": 0}


@functools.lru_cache(maxsize=None)
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(x: Any) -> bool:
    """Whether ``x`` is a DTensor."""
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def local(x: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor; any other tensor (or None) as it is.

    A contiguous shard is handed over with the strides of a new contiguous tensor: where a
    dim has size 1 (a shard of one row or column) DTensor ops may give it other strides
    than the state's, and the fused kernels want one layout for all four tensors."""
    if not is_sharded(x):
        return x
    shard = x.to_local()
    if shard.is_contiguous():
        strides = _contiguous_strides(shard.shape)
        if shard.stride() != strides:
            return shard.as_strided(shard.shape, strides)
    return shard


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= max(n, 1)
    return tuple(strides)


def _shard_dim(p: Tensor) -> int | None:
    """The dim a DTensor is sharded along (None: replicated), refusing what RMDA cannot take."""
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"RMDA takes DTensor parameters on a 1-D device mesh; got a "
                         f"{mesh.ndim}-D mesh (shape {tuple(p.shape)}, placements "
                         f"{p.placements})")
    (placement,) = p.placements
    if placement.is_shard():
        return placement.dim % p.dim()
    if placement.is_replicate():
        return None
    raise ValueError(f"RMDA cannot step a DTensor parameter placed as {placement} "
                     f"(shape {tuple(p.shape)}): a parameter is Shard(d) or Replicate()")


def check_placement(p: Tensor, where: str) -> None:
    """Refuse, naming ``where``, a DTensor parameter RMDA cannot step."""
    if is_sharded(p):
        try:
            _shard_dim(p)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def cuts(p: Tensor, grouping: str) -> bool:
    """Whether the sharding of ``p`` cuts its groups (they then take the reduce step)."""
    if not is_sharded(p) or grouping in ("none", "elementwise"):
        return False
    dim = _shard_dim(p)
    if dim is None:
        return False
    # coupled groups span tensors, whose shards lie on different ranks
    return grouping == "coupled" or dim != _GROUP_DIM[grouping]


def _chunk(size: int, p: Tensor) -> slice:
    """The rows of a dim of ``size`` this rank holds (torch.chunk's split, as DTensor's)."""
    mesh = p.device_mesh
    step = -(-size // mesh.size())
    start = min(mesh.get_local_rank() * step, size)
    return slice(start, min(start + step, size))


def local_groups(p: Tensor, grouping: str) -> slice:
    """Which of the groups of ``p`` its local shard holds: all of them unless ``p`` is a
    DTensor sharded along the groups' dim."""
    if is_sharded(p) and grouping in _GROUP_DIM:
        dim = _shard_dim(p)
        if dim == _GROUP_DIM[grouping]:
            return _chunk(p.shape[dim], p)
    return slice(None)


def cut_groups(tensors: list[tuple[Tensor, str]]) -> list[tuple[Tensor, Tensor]]:
    """(ids, |G| of each) of every group of each (tensor, grouping) whose groups its
    sharding cuts, for a reduce over them: numbered in turn, the same on every rank."""
    numbered, start = [], 0
    for p, grouping in tensors:
        view = group_view(p.shape, grouping)
        numbered.append((torch.arange(start, start + view.groups),
                         torch.full((view.groups,), float(view.group_size), dtype=torch.float64)))
        start += view.groups
    return numbered


def _split_layout(p: Tensor, grouping: str, dim: int) -> tuple[tuple[int, ...], int, slice]:
    """(global shape, sharded dim, this rank's slice of it) of one bool per group of a
    DTensor sharded along ``dim`` whose groups lie whole on the ranks, split among them."""
    if grouping == "elementwise":  # one entry per element: p's shape
        return tuple(p.shape), dim, _chunk(p.shape[dim], p)
    return (p.shape[dim],), 0, _chunk(p.shape[dim], p)


def _mask_layout(p: Tensor, grouping: str) -> tuple[tuple[int, ...], int, slice] | None:
    """The layout of the zero mask of a DTensor whose groups lie whole on the ranks and
    are split among them (:func:`_split_layout`); None: a plain mask."""
    if not is_sharded(p) or grouping == "none" or cuts(p, grouping):
        return None
    dim = _shard_dim(p)
    return None if dim is None else _split_layout(p, grouping, dim)


def _wrap_mask(local_mask: Tensor, p: Tensor, layout: tuple) -> Tensor:
    """The local part ``local_mask`` (any shape, right size) as the mask DTensor."""
    from torch.distributed.tensor import DTensor, Shard
    shape, dim, rows = layout
    local_shape = list(shape)
    local_shape[dim] = len(range(shape[dim])[rows])
    return DTensor.from_local(local_mask.reshape(local_shape), p.device_mesh, [Shard(dim)],
                              run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_strides(shape))


def _new_zero_mask(p: Tensor, grouping: str, groups: int) -> Tensor:
    """An all-False zero mask of the ``groups`` groups of ``p``: a DTensor sharded like the
    groups where they lie whole on the ranks, else a plain tensor of every group."""
    layout = _mask_layout(p, grouping)
    if layout is None:
        return torch.zeros(groups, dtype=torch.bool, device=p.device)
    shape, dim, rows = layout
    local_numel = len(range(shape[dim])[rows]) * (groups // shape[dim] if shape[dim] else 0)
    return _wrap_mask(torch.zeros(local_numel, dtype=torch.bool, device=p.device), p, layout)


def fit_zero_mask(p: Tensor, grouping: str, groups: int, mask: Tensor | None) -> Tensor:
    """``mask`` as :func:`_new_zero_mask` would lay it out, keeping its values (a mask loaded
    from an unsharded run, or saved sharded); a new mask when it has another size."""
    if mask is None or mask.numel() != groups:
        return _new_zero_mask(p, grouping, groups)
    layout = _mask_layout(p, grouping)
    if layout is None and not is_sharded(mask):
        return mask
    if is_sharded(mask):
        if layout is not None and tuple(mask.shape) == layout[0] and \
                mask.placements[0].is_shard(layout[1]):
            return mask
        mask = mask.full_tensor()
    if layout is None:
        return mask.reshape(-1).to(p.device)
    shape, dim, rows = layout
    part = mask.reshape(shape).to(p.device).narrow(dim, rows.start, rows.stop - rows.start)
    return _wrap_mask(part.contiguous(), p, layout)


def like(p: Tensor, value: Tensor) -> Tensor:
    """``value``, the local shard of a tensor laid out like ``p``, as such a DTensor (for a
    plain ``p``: ``value`` itself)."""
    if not is_sharded(p):
        return value
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def laid_out_like(p: Tensor, value: Tensor) -> Tensor:
    """``value``, of p's shape, laid out as p is: this rank's part of a plain tensor for a
    DTensor ``p`` (no communication), the whole of a DTensor for a plain ``p`` (a
    collective); else as it is. Zero masks are laid out at the next step instead
    (:func:`fit_zero_mask`)."""
    if is_sharded(p) and not is_sharded(value):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                 src_data_rank=None)
    if is_sharded(value) and not is_sharded(p):
        return value.full_tensor()
    return value


def full(x: Tensor) -> Tensor:
    """The whole of a DTensor (a collective: every rank calls it), flat for a mask."""
    return x.full_tensor() if is_sharded(x) else x


def reduce_group(params: list[Tensor], where: str) -> Any:
    """The process group of the device mesh of the DTensors ``params`` (a param group's
    tensors whose groups the sharding cuts); they must share one."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params}
    if len(meshes) != 1:
        raise ValueError(f"{where}: its DTensor parameters lie on {len(meshes)} device "
                         "meshes; a param group's reduce runs over one")
    return next(iter(meshes.values())).get_group(0)


def _all_reduce_(tensor: Tensor, group: Any, op: Any, what: str) -> None:
    import torch.distributed as dist
    try:
        dist.all_reduce(tensor, op=op, group=group)
    except RuntimeError as exc:  # gloo raises here; NCCL reports through its watchdog
        raise RuntimeError(
            f"RMDA: the all-reduce of {what} across {dist.get_world_size(group)} ranks "
            f"failed: a rank has died or stopped answering (the process group's timeout, "
            f"init_process_group(..., timeout=...), bounds the wait): {exc}") from exc


def sum_across(group: Any, what: str) -> Callable[[Tensor], None]:
    """The all_reduce hook of a reduce step over ``group``: sums in place."""
    import torch.distributed as dist
    return lambda totals: _all_reduce_(totals, group, dist.ReduceOp.SUM, what)


def agree_on_flag(flag: Tensor | None, params: list[Tensor]) -> Tensor | None:
    """The NaN/inf flag of the local gradients, maxed over the mesh of every DTensor among
    ``params``: each rank sees only its shards, and all must skip the same steps."""
    if flag is None:
        return None
    import torch.distributed as dist
    meshes = {id(p.device_mesh): p.device_mesh for p in params if is_sharded(p)}
    for mesh in meshes.values():
        _all_reduce_(flag, mesh.get_group(0), dist.ReduceOp.MAX, "the gradients' NaN/inf flag")
    return flag


def zero_groups_of(p: Tensor, grouping: str) -> Tensor:
    """One bool per group of ``p`` itself: is every entry exactly zero; for a DTensor, over
    every rank's shard (a collective), without gathering ``p``."""
    if not is_sharded(p):
        return zero_group_mask(p, grouping)
    mine = zero_group_mask(p.to_local(), grouping)
    dim = _shard_dim(p)
    if dim is None:
        return mine
    if grouping == "elementwise" or local_groups(p, grouping) != slice(None):
        # the groups are split among the ranks: gather them
        return _wrap_mask(mine, p, _split_layout(p, grouping, dim)).full_tensor().reshape(-1)
    import torch.distributed as dist
    nonzero = (~mine).to(torch.int32)
    _all_reduce_(nonzero, p.device_mesh.get_group(0), dist.ReduceOp.SUM, "zero groups")
    return nonzero == 0


def unwrap(optimizer: Any) -> tuple[Any, Any]:
    """(the optimizer holding the state, the process group it is sharded over): a wrapper
    exposing ``.optim`` (ZeroRedundancyOptimizer) holds only this rank's parameters there,
    over its ``process_group``; any other optimizer is itself, with None."""
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        import torch.distributed as dist
        return inner, getattr(optimizer, "process_group", None) or dist.group.WORLD
    return optimizer, None


def merge_masks(masks: list[Tensor], group: Any) -> list[Tensor]:
    """The masks of every rank's parameters, from each rank's own (those of parameters it
    does not hold are all False): a max across ``group``, one all-reduce."""
    if not masks:
        return masks
    import torch.distributed as dist
    flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
    _all_reduce_(flat, group, dist.ReduceOp.MAX, "zero masks")
    return list(flat.bool().split([m.numel() for m in masks]))


@torch.no_grad()
def apply_prox_point(optimizer: Any) -> None:
    """Set every parameter to its prox point z (``RMDA.apply_prox_point``), also through a
    wrapper such as ZeroRedundancyOptimizer: each rank sets the parameters it holds, then
    broadcasts them to the others. Every rank calls it."""
    inner, group = unwrap(optimizer)
    inner.apply_prox_point()
    if group is None:
        return
    import torch.distributed as dist
    mine = {id(p) for g in inner.param_groups for p in g["params"]}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    owners = torch.tensor([dist.get_rank(group) if id(p) in mine else -1 for p in params])
    _all_reduce_(owners, group, dist.ReduceOp.MAX, "parameter owners")
    for p, owner in zip(params, owners.tolist()):
        if owner >= 0:
            dist.broadcast(p.detach(), group=group, group_src=owner)
