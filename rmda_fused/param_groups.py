"""Split a model's parameters into the regularized and the unregularized param group."""
from __future__ import annotations

from typing import Any

from torch import nn

from .grouping import check_grouping


def param_groups(
    model: nn.Module, lam: float, grouping: str = "input_channel", **group_options: Any
) -> list[dict[str, Any]]:
    """Two param groups for :class:`rmda_fused.RMDA`.

    Weights of convolutions and linear layers (``nn.modules.conv._ConvNd``, ``nn.Linear``)
    get ``lam`` and ``grouping``; every other parameter (biases, normalisation, embeddings)
    gets ``lam=0`` and ``grouping="none"`` but still takes the dual-averaging update.
    ``group_options`` (e.g. ``lr``) are set on both groups. Shared parameters appear once.
    """
    check_grouping(grouping)
    regularized, plain, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_weight = name == "weight" and isinstance(
                module, (nn.modules.conv._ConvNd, nn.Linear)
            )
            (regularized if is_weight else plain).append(p)
    groups = []
    if regularized:
        groups.append(dict(params=regularized, lam=lam, grouping=grouping, **group_options))
    if plain:
        groups.append(dict(params=plain, lam=0.0, grouping="none", **group_options))
    return groups
