"""Split a model's parameters into regularized and unregularized param groups."""
from __future__ import annotations

from typing import Any

from torch import nn

from .coupling import channel_groups
from .grouping import check_grouping

COUPLED = "coupled"


def _grouped_conv_grouping(grouping: str) -> str:
    """The grouping :func:`param_groups` gives the weights of grouped and depthwise convs
    when the dense weights get ``grouping``.

    A grouped conv's weight is (O, I/groups, k...): its dim 1 indexes the channels inside one
    group of filters, so ``W[:, i]`` mixes input channels of every group, and for a depthwise
    conv (C, 1, k...) it is the whole kernel. One group per filter, ``W[o]``, is what
    zeroes one channel of a depthwise conv.
    """
    return "output_channel" if grouping in ("input_channel", COUPLED) else grouping


def _weight_grouping(module: nn.Module, name: str, grouping: str) -> str | None:
    """The grouping that regularizes parameter ``name`` of ``module``; None: not regularized."""
    if name != "weight":
        return None
    if isinstance(module, nn.Linear):
        return grouping
    # a transposed conv's weight is (I, O/groups, k...): its dim 1 is not an input channel,
    # so it is left unregularized rather than grouped wrongly
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        return None
    return grouping if module.groups == 1 else _grouped_conv_grouping(grouping)


def param_groups(
    model: nn.Module, lam: float, grouping: str = "input_channel", example_inputs: Any = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`rmda_fused.RMDA`, in this order, empty ones left out:

    1. weights of dense convolutions and linear layers (``nn.Conv1d/2d/3d`` with
       ``groups=1``, ``nn.Linear``): ``lam`` and ``grouping``;
    2. weights of grouped and depthwise convolutions (``groups > 1``) when ``grouping`` is
       ``"input_channel"`` or ``"coupled"``: ``lam`` and ``"output_channel"``, one group per
       filter (for a depthwise conv, one per channel). For any other ``grouping`` they are
       in group 1;
    3. every other parameter (biases, normalisation, embeddings): ``lam=0`` and
       ``grouping="none"``; it still takes the dual-averaging update.

    ``grouping="coupled"`` makes one group of each channel that several dense layers read
    (a residual stream, a concatenation, flatten -> linear): the columns of all of them
    for that channel (:mod:`rmda_fused.coupling`), so that a zero group is a channel
    :func:`rmda_fused.slim.slim` removes. Group 1 then carries ``channel_groups``, aligned
    with its params: each weight's coupled group id per column. The channels are found by
    tracing ``model`` on ``example_inputs`` (a batch it accepts; required) with
    Torch-Pruning (``pip install torch-pruning``); a model it cannot trace raises
    :class:`rmda_fused.slim.SlimError` naming the model.

    Transposed convolutions go to the last group: their weight layout (I, O/groups, k...)
    does not match the groupings. ``group_options`` (e.g. ``lr``) are set on every group.
    Shared parameters appear once; frozen ones (``requires_grad=False``) are left out.
    """
    check_grouping(grouping)
    if grouping == COUPLED and example_inputs is None:
        raise ValueError("grouping 'coupled' needs example_inputs: a batch the model "
                         "accepts, to trace which layers read each channel")
    if grouping != COUPLED and example_inputs is not None:
        raise ValueError(f"example_inputs is only used by grouping 'coupled', not {grouping!r}")
    # one list per grouping: when grouped convs take ``grouping`` itself, they share its list
    regularized = {grouping: [], _grouped_conv_grouping(grouping): []}
    plain, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            weight_grouping = _weight_grouping(module, name, grouping)
            (plain if weight_grouping is None else regularized[weight_grouping]).append(p)
    groups = [dict(params=params, lam=lam, grouping=g, **group_options)
              for g, params in regularized.items() if params]
    if grouping == COUPLED and regularized[COUPLED]:
        groups[0]["channel_groups"] = channel_groups(model, example_inputs, regularized[COUPLED])
    if plain:
        groups.append(dict(params=plain, lam=0.0, grouping="none", **group_options))
    return groups
