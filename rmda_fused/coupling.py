"""Coupled channel groups: which columns of a model's dense weights read the same channel.

A channel of an activation (a residual stream, a concatenation, the input of a classifier
after ``flatten``) is often read by several dense layers (convs with ``groups=1``, linear
layers). It can be removed from the model exactly when every one of them ignores it, i.e.
when all of their input-channel columns ``W[:, j, ...]`` for it are zero; then its producers
(conv filters, BN channels, the filters of an SE block's gate) go too. A *coupled set* is a
set of channels produced and read together; a *coupled group* is, for one channel k of a
set, the columns of every dense consumer that read k (a flatten -> linear consumer reads
one channel through several columns).

The sets come from Torch-Pruning's dependency graph: one of its groups is a coupled set when
every layer in it keeps channels apart (conv/linear, BN, depthwise conv, residual adds and
other element-wise ops, concatenations, splits, flatten -> linear index maps) and at least
one dense layer reads it. A group through a layer that mixes channels (LayerNorm, GroupNorm,
a grouped or transposed conv, attention, the model's output) is no coupled set: removing
one of its channels would change what that layer computes. A layer that runs more than
once per forward, or shares its weight with another layer, reads several activations
through one column, so no set containing it is coupled either. Element-wise ops Torch-Pruning
does not know it treats as channel-wise; one that reduces over channels (``x.sum(1)``)
breaks that assumption, which :func:`rmda_fused.slim.compare` would show.

This module is the one definition of the sets: :func:`rmda_fused.param_groups` with
``grouping="coupled"`` regularizes these groups and :func:`rmda_fused.slim.slim` removes the
channels whose groups are zero, so every zero coupled group becomes a removed channel.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["TorchPruningError", "TracedModel", "CoupledSet", "ColumnGroups", "import_torch_pruning",
           "dependency_graph", "coupled_sets", "column_groups", "channel_groups",
           "is_dense_consumer", "zero_groups_"]

_CONVS = nn.modules.conv._ConvNd


class TorchPruningError(RuntimeError):
    """Torch-Pruning failed on this model (the model itself is untouched)."""


def import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as exc:
        raise ImportError("coupled channel groups and rmda_fused.slim need Torch-Pruning's "
                          "dependency graph: pip install torch-pruning") from exc
    return torch_pruning


@contextmanager
def torch_pruning_step(model: nn.Module, step: str) -> Iterator[None]:
    """TorchPruningError naming the model's class and ``step`` for whatever Torch-Pruning
    raises (on ShuffleNetV2, a bare ZeroDivisionError from deep inside its graph code)."""
    try:
        yield
    except Exception as exc:
        raise TorchPruningError(f"Torch-Pruning failed on {type(model).__name__} while {step}: "
                                f"{type(exc).__name__}: {exc}") from exc


def is_dense_consumer(module: nn.Module) -> bool:
    """A layer whose weight's dim 1 indexes its input channels, each read by every output:
    a linear layer or a non-transposed conv with ``groups=1``."""
    # grouped/depthwise convs tie input to output channels; transposed convs lay weights out
    # as (I, O, k...): neither has the input-channel columns RMDA regularizes
    return isinstance(module, nn.Linear) or (
        isinstance(module, _CONVS) and module.groups == 1 and not module.transposed)


def _is_depthwise(module: nn.Module) -> bool:
    # one filter per channel: channel k in, channel k out (no channel multiplier)
    return (isinstance(module, _CONVS) and not module.transposed
            and module.groups == module.in_channels == module.out_channels)


class TracedModel(NamedTuple):
    graph: Any  # torch_pruning.DependencyGraph
    calls: Counter  # forward calls of each module during the trace
    shared_weights: set[int]  # id() of weights owned by more than one module


def _forward(model: nn.Module, inputs: Any) -> Any:
    # exactly one call: Torch-Pruning's default tries model(*inputs) first, which for a
    # tensor runs part of the model on inputs[0] (convs accept unbatched inputs) and then
    # every layer up to the failure would count two calls
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def dependency_graph(model: nn.Module, example_inputs: Any) -> TracedModel:
    """Torch-Pruning's dependency graph of ``model`` run on ``example_inputs``. Tracing runs
    one forward pass in eval mode; each module's training flag is restored afterwards."""
    tp = import_torch_pruning()
    training = {m: m.training for m in model.modules()}
    calls: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, inputs, output: calls.update([m]))
             for m in model.modules()]
    try:
        # Torch-Pruning traces the autograd graph
        with torch.enable_grad(), torch_pruning_step(model, "tracing its channel dependency graph"):
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, forward_fn=_forward, verbose=False)
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in training.items():
            m.training = flag
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return TracedModel(graph, calls, {p for p, n in owners.items() if n > 1})


class CoupledSet(NamedTuple):
    """``size`` channels, indexed like the outputs of ``root``; ``columns``: for each dense
    consumer, its columns that read the set and the channel (root index) each one reads."""
    root: nn.Module
    handler: Callable  # Torch-Pruning's pruning function of ``root`` for these channels
    size: int
    columns: tuple[tuple[nn.Module, Tensor, Tensor], ...]


def _coupled_set(traced: TracedModel, group: Any) -> CoupledSet | None:
    from torch_pruning.ops import OPTYPE

    channelwise = {OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.LINEAR, OPTYPE.BN,
                   OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE, OPTYPE.CONCAT, OPTYPE.SPLIT}
    columns = []
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        if node.type not in channelwise or traced.calls[module] > 1:
            return None
        if node.type == OPTYPE.DEPTHWISE_CONV and not _is_depthwise(module):
            return None
        if node.type in (OPTYPE.CONV, OPTYPE.LINEAR):
            if not is_dense_consumer(module) or id(module.weight) in traced.shared_weights:
                return None
            if traced.graph.is_in_channel_pruning_fn(item.dep.handler):
                columns.append((module, torch.tensor(item.idxs, dtype=torch.int64),
                                torch.tensor(item.root_idxs, dtype=torch.int64)))
    if not columns:  # e.g. the classifier's outputs: they are the model's output
        return None
    return CoupledSet(group[0].dep.target.module, group[0].dep.handler, len(group[0].idxs),
                      tuple(columns))


def coupled_sets(traced: TracedModel) -> list[CoupledSet]:
    """The coupled sets of a traced model; disjoint (each channel in one set at most)."""
    with torch_pruning_step(traced.graph.model, "grouping coupled channels"):
        groups = list(traced.graph.get_all_groups())
    return [s for s in (_coupled_set(traced, g) for g in groups) if s is not None]


class ColumnGroups(NamedTuple):
    """``ids[w]``: the coupled group id of each column of dense weight ``w`` (int64, CPU,
    shape ``(w.shape[1],)``), in [0, ``num_groups``); ``coupled[g]``: whether group g is a
    channel of a coupled set (else it is one column of its own, e.g. an image channel)."""
    ids: dict[nn.Parameter, Tensor]
    num_groups: int
    coupled: Tensor


def column_groups(model: nn.Module, example_inputs: Any) -> ColumnGroups:
    """The coupled group of every column of every dense conv/linear weight of ``model``;
    columns in no coupled set get an id of their own (the paper's input-channel groups)."""
    traced = dependency_graph(model, example_inputs)
    ids: dict[nn.Module, Tensor] = {}
    next_id = 0
    for s in coupled_sets(traced):
        for module, cols, channels in s.columns:
            ids.setdefault(module, torch.full((module.weight.shape[1],), -1, dtype=torch.int64))
            ids[module][cols] = next_id + channels
        next_id += s.size
    in_sets = next_id
    by_weight: dict[nn.Parameter, Tensor] = {}
    for module in model.modules():
        if not is_dense_consumer(module) or module.weight in by_weight:
            continue
        col_ids = ids.get(module, torch.full((module.weight.shape[1],), -1, dtype=torch.int64))
        alone = col_ids < 0
        col_ids[alone] = torch.arange(next_id, next_id + int(alone.sum()))
        next_id += int(alone.sum())
        by_weight[module.weight] = col_ids
    compact = _compact(list(by_weight.values()))
    coupled = torch.zeros(compact.num_groups, dtype=torch.bool)
    for raw, new in zip(by_weight.values(), compact.ids):
        coupled[new[raw < in_sets]] = True
    return ColumnGroups(dict(zip(by_weight, compact.ids)), compact.num_groups, coupled)


class _Compact(NamedTuple):
    ids: list[Tensor]
    num_groups: int


def _compact(ids: list[Tensor]) -> _Compact:
    """The same partition of columns with ids renumbered to 0..n-1 (ids nothing uses, such
    as a channel no kept weight reads, leave no gaps)."""
    if not ids:
        return _Compact([], 0)
    unique, inverse = torch.unique(torch.cat(ids), return_inverse=True)
    return _Compact(list(inverse.split([len(i) for i in ids])), len(unique))


def channel_groups(model: nn.Module, example_inputs: Any, params: list[nn.Parameter]
                   ) -> list[Tensor]:
    """The ``channel_groups`` of a ``grouping="coupled"`` param group holding ``params``
    (dense conv/linear weights of ``model``): their column ids, renumbered to 0..n-1."""
    groups = column_groups(model, example_inputs)
    return _compact([groups.ids[p] for p in params]).ids


@torch.no_grad()
def zero_groups_(groups: ColumnGroups, which: Tensor) -> None:
    """Zero every column of the groups where the bool mask ``which`` (one per group id) is
    set, in place: the pattern a ``grouping="coupled"`` prox step leaves when it zeroes them."""
    for weight, ids in groups.ids.items():
        weight[:, which[ids].to(weight.device)] = 0
