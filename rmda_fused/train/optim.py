"""The optimizer and learning-rate schedule a run trains with (``--optimizer``)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import RMDA, MultiStepRestart, ProxSGD, param_groups

# lr and momentum defaults when not given: RMDA's from the authors' ImageNet recipe (lr is
# the dual-averaging base step, momentum is c, the weight of the new point); the baselines'
# are the usual SGD ones (lr 0.1 for a batch of 256, momentum 0.9)
DEFAULT_LR = {"rmda": 1.0, "proxsgd": 0.1, "sgd": 0.1}
DEFAULT_MOMENTUM = {"rmda": 0.1, "proxsgd": 0.9, "sgd": 0.9}


def build(args: Any, model: nn.Module, example_inputs: torch.Tensor | None = None,
          wrap: Callable[[list[dict] | None], list[dict] | None] | None = None,
          ) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, scheduler); ``scheduler.step()`` is called once per epoch. SystemExit with
    the optimizer's own message when it refuses a hyper-parameter (e.g. RMDA's c = 0).
    ``example_inputs``: a batch the model takes, which ``--grouping coupled`` traces.
    ``wrap``: called once the param groups are made on the unwrapped model (None for SGD),
    e.g. to shard it; returns the groups holding the parameters that replaced its own."""
    try:
        groups = None if args.optimizer == "sgd" else _groups(args, model, example_inputs)
        if wrap is not None:
            groups = wrap(groups)
        return _build(args, model, groups)
    except ValueError as exc:
        raise SystemExit(f"--optimizer {args.optimizer}: {exc}") from None


def _groups(args: Any, model: nn.Module, example_inputs: torch.Tensor | None) -> list[dict]:
    if args.grouping == "coupled":
        return param_groups(model, args.lam, "coupled", example_inputs=example_inputs)
    return param_groups(model, args.lam, args.grouping)


def _build(args: Any, model: nn.Module,
           groups: list[dict] | None) -> tuple[torch.optim.Optimizer, Any]:
    if args.optimizer == "rmda":
        optimizer = RMDA(groups, lr=args.lr, momentum=args.momentum, backend=args.backend)
        schedule = None if args.momentum_schedule == "none" else args.momentum_schedule
        return optimizer, MultiStepRestart(optimizer, args.milestones, gamma=args.gamma,
                                           momentum_schedule=schedule)
    if args.optimizer == "proxsgd":
        # the same two groups as RMDA: conv/linear weights regularized, the rest plain
        optimizer = ProxSGD(groups, lr=args.lr, momentum=args.momentum)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, args.gamma)
