"""Split a model's parameters into the regularized and the unregularized param group."""
from __future__ import annotations

from typing import Any

from torch import nn

from .grouping import check_grouping


def param_groups(
    model: nn.Module, lam: float, grouping: str = "input_channel", **group_options: Any
) -> list[dict[str, Any]]:
    """Two param groups for :class:`rmda_fused.RMDA`.

    Weights of convolutions and linear layers (``nn.Conv1d/2d/3d``, ``nn.Linear``) get
    ``lam`` and ``grouping``; every other parameter (biases, normalisation, embeddings)
    gets ``lam=0`` and ``grouping="none"`` but still takes the dual-averaging update.
    Transposed convolutions go to the second group: their weight layout (I, O/groups, k...)
    does not match the groupings. ``group_options`` (e.g. ``lr``) are set on both groups.
    Shared parameters appear once; frozen ones (``requires_grad=False``) are left out.
    """
    check_grouping(grouping)
    regularized, plain, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            # a transposed conv's weight is (I, O/groups, k...): its dim 1 is not an input
            # channel, so it is left unregularized rather than grouped wrongly
            is_weight = name == "weight" and (
                isinstance(module, nn.Linear)
                or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed)
            )
            (regularized if is_weight else plain).append(p)
    groups = []
    if regularized:
        groups.append(dict(params=regularized, lam=lam, grouping=grouping, **group_options))
    if plain:
        groups.append(dict(params=plain, lam=0.0, grouping="none", **group_options))
    return groups
