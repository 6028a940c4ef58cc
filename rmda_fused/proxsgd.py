"""``ProxSGD``: the standard baseline RMDA is compared against.

torch's SGD with momentum, then the proximal step of the same regularizer (group LASSO / L1
as in :mod:`rmda_fused.grouping`) with threshold ``lr * lam``. Its zero groups are recorded
in ``state[p]["zero_mask"]`` like RMDA's, so :mod:`rmda_fused.structure` and
:class:`~rmda_fused.IdentificationTracker` report on it the same way (its iterate is its
prox point). It is a reference-speed baseline, not a fused kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .coupled import check_channel_groups, coupled_prox_
from .grouping import check_grouping, effective_grouping, group_prox_
from .structure import MASK_KEY, with_current_mask_key


class ProxSGD(torch.optim.SGD):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        lam: float = 0.0,
        grouping: str = "input_channel",
        **sgd_options: Any,
    ) -> None:
        if sgd_options.get("weight_decay"):
            raise ValueError("ProxSGD: use lam (the regularizer) instead of weight_decay")
        if not lam >= 0.0:
            raise ValueError(f"ProxSGD: invalid lam={lam!r} (must be >= 0)")
        check_grouping(grouping)
        self._prox_defaults = dict(lam=lam, grouping=grouping)
        super().__init__(params, lr=lr, momentum=momentum, **sgd_options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in getattr(self, "_prox_defaults", {}).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_grouping(group["grouping"])
        check_channel_groups(group, where=f"ProxSGD: param group {len(self.param_groups) - 1}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss  # the SGD step was skipped; so is the prox
        for group in self.param_groups:
            if group["grouping"] == "none":
                continue
            tau = group["lr"] * group["lam"]
            coupled = []
            for i, p in enumerate(group["params"]):
                grouping = effective_grouping(p.shape, group["grouping"])
                if p.grad is None or grouping == "none":
                    continue
                if grouping == "coupled":  # shrunk below, together
                    coupled.append((p, group["channel_groups"][i]))
                else:
                    self.state[p][MASK_KEY] = group_prox_(p, tau, grouping)
            if coupled:
                masks = coupled_prox_([p for p, _ in coupled], [ids for _, ids in coupled],
                                      [tau] * len(coupled))
                for (p, _), mask in zip(coupled, masks):
                    self.state[p][MASK_KEY] = mask
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(with_current_mask_key(state_dict))
        for state in self.state.values():  # torch casts every floating state to the param dtype
            if MASK_KEY in state:
                state[MASK_KEY] = state[MASK_KEY].bool()
