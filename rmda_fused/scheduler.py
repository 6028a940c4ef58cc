"""``MultiStepRestart``: MultiStepLR that also restarts RMDA's dual averaging at milestones."""
from __future__ import annotations

import math
from typing import Any, Iterable

from torch.optim.lr_scheduler import MultiStepLR

from .sharding import unwrap

MOMENTUM_SCHEDULES = (None, "iclr", "sqrt")


class MultiStepRestart(MultiStepLR):
    """At each milestone (counted in ``scheduler.step()`` calls, usually epochs): lr *= gamma
    and ``optimizer.restart()`` (W0 <- W, V <- 0, t <- 0, A <- 0).

    ``momentum_schedule`` (docs/algorithm.md, "Restart"):

    - ``None``: c stays as set.
    - ``"iclr"`` (the authors' ICLR'22 code): at each milestone c <- min(c / gamma, 1).
    - ``"sqrt"`` (their follow-up code): after the last milestone, the k-th optimizer step
      uses c = min(c0 * sqrt(k), 1), c0 being the group's momentum when the scheduler was made.
      k counts ``optimizer.step()`` calls, including ones a GradScaler turned into no-ops.

    ``optimizer`` may be a wrapper exposing ``.optim`` (ZeroRedundancyOptimizer over RMDA):
    lr and c are set on its param groups, which it hands to ``.optim`` at each step, and
    ``.optim`` restarts the parameters this rank holds.
    """

    def __init__(
        self,
        optimizer: Any,
        milestones: Iterable[int],
        gamma: float = 0.1,
        momentum_schedule: str | None = None,
        last_epoch: int = -1,
    ) -> None:
        # a wrapper that shards the optimizer (ZeroRedundancyOptimizer) holds it in .optim:
        # lr and c are set on the wrapper's groups, which it hands on at each step
        self._restarted, _ = unwrap(optimizer)
        if not callable(getattr(self._restarted, "restart", None)):
            raise TypeError(
                f"MultiStepRestart needs an optimizer with restart() (rmda_fused.RMDA, or a "
                f"wrapper of one exposing .optim), got {type(optimizer).__name__}"
            )
        milestones = list(milestones)
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be increasing positive ints, got {milestones}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(
                f"unknown momentum_schedule {momentum_schedule!r}; expected None, 'iclr' or 'sqrt'"
            )
        self.momentum_schedule = momentum_schedule
        self.base_momenta = [g["momentum"] for g in optimizer.param_groups]
        # optimizer steps since the last milestone once it has passed (the "sqrt" schedule)
        self.steps_after_last_milestone: int | None = None
        super().__init__(optimizer, milestones, gamma, last_epoch)
        self._hook = (
            optimizer.register_step_post_hook(self._sqrt_momentum_step)
            if momentum_schedule == "sqrt" else None
        )

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.last_epoch not in self.milestones:
            return
        self._restarted.restart()
        if self.momentum_schedule == "iclr":
            for group in self.optimizer.param_groups:
                group["momentum"] = min(group["momentum"] / self.gamma, 1.0)
        elif self.momentum_schedule == "sqrt" and self.last_epoch == max(self.milestones):
            self.steps_after_last_milestone = 0
            self._set_sqrt_momentum()

    def _set_sqrt_momentum(self) -> None:
        k = self.steps_after_last_milestone + 1  # the step about to be taken
        for group, c0 in zip(self.optimizer.param_groups, self.base_momenta):
            group["momentum"] = min(c0 * math.sqrt(k), 1.0)

    def _sqrt_momentum_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.steps_after_last_milestone is not None:
            self.steps_after_last_milestone += 1
            self._set_sqrt_momentum()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("_hook", "_restarted"):  # live wiring, not state
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hook, restarted = self._hook, self._restarted
        super().load_state_dict(state_dict)
        self._hook, self._restarted = hook, restarted
