"""``RMDA``: the torch.optim.Optimizer around :mod:`rmda_fused.functional`."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _state_loading, coupled, functional, sharding
from ._step_plan import GroupPlan
from ._warnings import warn_caller
from .batch import state_dtype
from .grouping import (
    GroupView, check_grouping, effective_grouping, group_prox_, group_view,
)
from .structure import MASK_KEY

__all__ = ["RMDA", "STATE_KEYS"]

# Per-parameter state (the keys of ``optimizer.state[p]`` and of ``state_dict()["state"]``):
#   initial    W0, the parameter at the first step or the last restart (parameter dtype)
#   dual       V, the weighted sum of gradients since then (fp32; fp64 for fp64 params)
#   step       t, steps since the last restart (0-d tensor on the parameter's device)
#   alpha      A, sum of the step sizes lr*sqrt(t) since then (0-d tensor, like step)
#   zero_mask  one bool per group: is that group of the prox point z exactly zero after the
#              last step (absent for grouping="none")
STATE_KEYS = ("initial", "dual", "step", "alpha", MASK_KEY)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# torch.optim's standard switches. RMDA accepts them when off; each job they name is done by
# a backend instead, chosen with ``backend=``.
_TORCH_SWITCHES = {
    "foreach": "RMDA always runs multi-tensor: backend='reference' is its torch._foreach "
               "implementation, backend='auto' a fused kernel",
    "fused": "backend='auto' already runs a fused kernel where one is available; name one "
             "with backend='cpu', 'cuda' or 'triton'",
    "capturable": "the switch is not needed: the 'cuda' backend's step is captured in a "
                  "CUDA graph as it is (with lr a device tensor; tests/test_cuda_graphs.py), "
                  "and the other backends are not tested under capture",
    "differentiable": "no backend differentiates through RMDA's step",
}
_MOMENTUM_WARN_ABOVE = 0.5
# group keys a state dict or pickle from before they existed may lack, with their defaults
_OPTIONAL_DEFAULTS: dict[str, Any] = dict(
    maximize=False, skip_nonfinite=True, weight_decay=0.0, foreach=None, fused=None,
    capturable=False, differentiable=False)
_OPTIONAL_KEYS = tuple(_OPTIONAL_DEFAULTS)


class RMDA(torch.optim.Optimizer):
    r"""Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022, Algorithm 1).

    Args:
        params: parameters, named parameters or param groups (dicts may set lr, momentum,
            lam, grouping, maximize, skip_nonfinite).
        lr: the base step size; step t uses ``s_t = lr * sqrt(t)``.
        momentum: **c**, the weight of the new prox point in ``W <- (1-c) W + c z``,
            0 < c <= 1 (the authors use 0.1). Not SGD's 0.9: above 0.5 RMDA warns once.
        lam: regularization strength (group LASSO / L1), >= 0.
        grouping: ``"input_channel"``, ``"output_channel"``, ``"elementwise"`` (L1),
            ``"coupled"`` (a group per channel over every tensor that reads it: the group
            then needs ``channel_groups``, see :mod:`rmda_fused.coupled`) or ``"none"``;
            see :mod:`rmda_fused.grouping`. Tensors with fewer than 2 dims
            (biases, norm weights) are not regularized in a channel grouping.
        backend: ``"auto"`` or a name from :func:`rmda_fused.available_backends`.
        maximize: follow the gradient upwards (the objective is maximized).
        skip_nonfinite: when no GradScaler hands over ``found_inf``, check the gradients
            of these groups for NaN/inf on the device (one extra read of the gradients, no
            host sync) and skip the step for all of them if any is not finite, so that V
            never holds a NaN; ``False`` saves that read.
        weight_decay: accepted as 0 only (optimizer factories pass it): ``lam`` is RMDA's
            regularizer.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted when
            False or None; ``backend`` does their jobs.

    The per-parameter state keys are ``initial``, ``dual``, ``step``, ``alpha`` and
    ``zero_mask`` (see ``STATE_KEYS`` in this module). ``restart()`` resets the dual
    averaging at W; ``apply_prox_point()`` sets every parameter to its exactly structured
    prox point z.
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 0.1,
        momentum: float = 0.1,
        lam: float = 0.0,
        grouping: str = "input_channel",
        backend: str = "auto",
        *,
        maximize: bool = False,
        skip_nonfinite: bool = True,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, lam=lam, grouping=grouping, backend=backend,
                        maximize=maximize, skip_nonfinite=skip_nonfinite,
                        weight_decay=weight_decay, foreach=foreach, fused=fused,
                        capturable=capturable, differentiable=differentiable)
        self._check_hyperparameters(defaults, where="RMDA")
        self._check_switches(defaults, where="RMDA")
        self._momentum_warned = False
        self._steps_elsewhere = False  # set by a load that left some t on another device
        self._plans: dict[int, GroupPlan] = {}  # param group index -> its step plan
        super().__init__(params, defaults)
        # torch's loading casts state to the parameter's dtype: these hooks keep RMDA's
        # (rmda_fused/_state_loading.py); first among post-hooks, so the caller's run after
        self.register_load_state_dict_post_hook(_state_loading.unwrap, prepend=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_momentum_warned", False)
        self.__dict__.setdefault("_steps_elsewhere", False)
        self._plans = {}
        for group in self.param_groups:  # optimizers pickled before these options existed
            for key in _OPTIONAL_KEYS:
                group.setdefault(key, _OPTIONAL_DEFAULTS[key])

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
        lr, momentum, lam = group["lr"], group["momentum"], group["lam"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        elif not _is_number(lr) or not 0.0 <= lr < math.inf:
            raise ValueError(f"{where}: Invalid learning rate: {lr!r} (must be a finite number >= 0)")
        if not _is_number(momentum) or not 0.0 < momentum <= 1.0:
            raise ValueError(
                f"{where}: Invalid momentum value: {momentum!r}: RMDA's momentum is c, the "
                "weight of the new point, and must satisfy 0 < c <= 1 (the paper uses 0.1, "
                "not SGD's 0.9)"
            )
        if not _is_number(lam) or not 0.0 <= lam < math.inf:
            raise ValueError(f"{where}: Invalid lam value: {lam!r} (must be a finite number >= 0)")
        weight_decay = group.get("weight_decay", 0.0)
        if not (_is_number(weight_decay) and weight_decay == 0.0):
            raise ValueError(
                f"{where}: Invalid weight_decay value: {weight_decay!r}: RMDA has no "
                "weight_decay, the regularizer lam replaces it (weight_decay=0 is accepted)")
        for flag in ("maximize", "skip_nonfinite"):
            if not isinstance(group.get(flag, False), bool):
                raise TypeError(f"{where}: {flag} must be True or False, got {group[flag]!r}")
        try:
            check_grouping(group["grouping"])
            functional.check_backend_name(group["backend"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @staticmethod
    def _check_switches(group: dict[str, Any], where: str) -> None:
        """torch.optim's switches, checked when a group is made or loaded, not per step:
        torch.compile traces a step with every group's "capturable" set to True."""
        for switch, instead in _TORCH_SWITCHES.items():
            value = group.get(switch)
            if value not in (None, False):
                raise ValueError(f"{where}: {switch}={value!r} is not supported: {instead} "
                                 f"(pass {switch}=False or None)")

    def _warn_if_large_momentum(self, typed: bool) -> None:
        """Once per optimizer: c above 0.5 typed in (``typed``) is almost always SGD's
        momentum by habit; set by OneCycleLR/CyclicLR, it is their cycle of "momentum",
        which is c here. (MultiStepRestart raises c towards 1 on purpose: not warned.)"""
        for group in self.param_groups:
            if self._momentum_warned or group["momentum"] <= _MOMENTUM_WARN_ABOVE:
                continue
            if "max_momentum" in group or "base_momentum" in group:
                cause = ("a OneCycleLR or CyclicLR scheduler cycles 'momentum', which is c in "
                         "RMDA: create it with cycle_momentum=False")
            elif typed:
                cause = ("SGD's momentum typed by habit? RMDA's c is the weight of the new "
                         "point, and the paper uses 0.1")
            else:
                continue
            warn_caller(f"RMDA: momentum c={group['momentum']} > {_MOMENTUM_WARN_ABOVE}: {cause}")
            self._momentum_warned = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_new_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        self._warn_if_large_momentum(typed=True)

    def _check_new_group(self, group: dict[str, Any], index: int) -> None:
        self._check_hyperparameters(group, where=f"param group {index}")
        self._check_switches(group, where=f"param group {index}")
        if isinstance(group["lr"], Tensor) and not 0.0 <= float(group["lr"]) < math.inf:
            # checked once here, not per step: reading a device lr would sync
            raise ValueError(f"param group {index}: Invalid learning rate: {group['lr']!r} "
                             "(must be finite and >= 0)")
        coupled.check_channel_groups(group, where=f"param group {index}")
        for i, p in enumerate(group["params"]):
            name = f"param group {index}, parameter {i}"
            if p.is_complex():
                raise TypeError(f"RMDA does not support complex parameters ({name}, shape {tuple(p.shape)})")
            if not p.is_floating_point():
                raise TypeError(f"RMDA needs floating-point parameters ({name} is {p.dtype})")
            sharding.check_placement(p, name)
        for device in dict.fromkeys(p.device for p in group["params"]):
            functional.resolve_backend(group["backend"], device)  # the step only looks it up

    # -- state -----------------------------------------------------------------------------

    def _init_state(self, p: Tensor, grouping: str) -> dict[str, Tensor]:
        grouping = effective_grouping(p.shape, grouping)
        return self._state_for(p, grouping, group_view(p.shape, grouping))

    def _state_for(self, p: Tensor, grouping: str, view: GroupView | None) -> dict[str, Tensor]:
        """The state of ``p``, created on first use; its mask fits ``grouping`` (the
        parameter's effective grouping, whose group view is ``view``)."""
        state = self.state[p]
        if not state:
            acc = state_dtype(p.dtype)
            state["initial"] = p.detach().clone()
            state["dual"] = torch.zeros_like(p, dtype=acc)
            state["step"] = torch.zeros((), dtype=acc, device=p.device)
            state["alpha"] = torch.zeros((), dtype=acc, device=p.device)
        if view is None:
            state.pop(MASK_KEY, None)
        else:  # a DTensor's mask is laid out by rmda_fused/sharding.py
            state[MASK_KEY] = sharding.fit_zero_mask(p, grouping, view.groups,
                                                     state.get(MASK_KEY))
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self._steps_elsewhere:
            self._move_steps_to_params()
        # every group is checked, and its backend resolved, before any state is created or
        # any tensor written: a refused step leaves the optimizer and the parameters as
        # they were. A group whose step plan still fits skips the full checks.
        checked = []
        for index, group in enumerate(self.param_groups):
            self._check_hyperparameters(group, where=f"param group {index}")
            plan = self._plans.get(index)
            if plan is None or not plan.matches(self.state, group):
                plan = None
                self._check_step_inputs(index, group)
            checked.append((index, group, plan))
        if not self._momentum_warned:
            self._warn_if_large_momentum(typed=False)
        work = []
        for index, group, plan in checked:
            if plan is None:
                plan = self._plans[index] = GroupPlan(self, group)
            work.append((group, plan))
        checked_inf = found_inf
        if found_inf is None:  # no GradScaler checked these gradients: check them here
            checked_inf = self._nonfinite_flag([plan for group, plan in work
                                                if group["skip_nonfinite"]])
        for group, plan in work:
            skip_flag = checked_inf if group["skip_nonfinite"] else found_inf
            plan.run(group, grad_scale, skip_flag)
        return loss

    @staticmethod
    def _nonfinite_flag(plans: list[GroupPlan]) -> Tensor | None:
        """found_inf of the gradients of ``plans`` (functional.nonfinite_flag)."""
        devices = {device for plan in plans for device in plan.devices}
        if len(devices) == 1 and all(plan.native for plan in plans):
            flag = functional.planned_nonfinite_flag([plan.watch for plan in plans],
                                                     devices.pop())
            if flag is not None:
                return flag
        sharded = [p for plan in plans for p in plan.sharded]
        # each rank checks its shards only
        flag = functional.nonfinite_flag([g for plan in plans for g in plan.local_grads()
                                          if g is not None])
        return sharding.agree_on_flag(flag, sharded) if sharded else flag

    def _check_step_inputs(self, index: int, group: dict[str, Any]) -> None:
        """The full per-step checks of a group's gradients and backends (before a plan)."""
        with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        functional.check_grads([p for _, p in with_grad], [p.grad for _, p in with_grad],
                               lambda k: f"param group {index}, parameter {with_grad[k][0]}")
        for device in dict.fromkeys(p.device for _, p in with_grad):
            functional.resolve_backend(group["backend"], device)
        coupled.check_members_step_together(
            group, [p.grad is not None for p in group["params"]], where=f"param group {index}")

    def _move_steps_to_params(self) -> None:
        """t back on its parameter's device after a load kept it where it was saved."""
        for state_p, state in self.state.items():
            if isinstance(state_p, Tensor) and "step" in state:
                state["step"] = state["step"].to(state_p.device)
        self._steps_elsewhere = False
        self._plans.clear()  # they hold the replaced step tensors

    def backend_names(self) -> list[str]:
        """The backend each param group's step runs on: ``auto`` resolved for the device of
        its parameters (``a/b`` when they span devices). Parameters whose layout or dtype the
        fused kernels cannot take run on ``reference`` within the same step, with a warning."""
        names = []
        for group in self.param_groups:
            devices = dict.fromkeys(p.device for p in group["params"])
            names.append("/".join(functional.resolve_backend(group["backend"], d)
                                  for d in devices) or "-")
        return names

    @torch.no_grad()
    def restart(self) -> None:
        """Restart dual averaging at the current point: W0 <- W, V <- 0, t <- 0, A <- 0."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init_state(p, group["grouping"])
                state["initial"].copy_(p)
                for key in ("dual", "step", "alpha"):
                    state[key].zero_()

    @torch.no_grad()
    def prox_point(self, p: Tensor) -> Tensor:
        """z = prox(W0 - V/beta, lam*A/beta) for one parameter, rebuilt from its state (for a
        coupled group's member, from the state of every member of its group).

        A parameter that has taken no step since the last restart has no z; its W is returned.
        """
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        return self._prox_points(group, only=index)[index]

    @torch.no_grad()
    def apply_prox_point(self) -> None:
        """Set every parameter to its prox point z: groups the prox zeroed become exactly 0."""
        for group in self.param_groups:
            points = self._prox_points(group)
            for i, p in enumerate(group["params"]):
                p.copy_(points[i])

    def _prox_points(self, group: dict[str, Any], only: int | None = None) -> dict[int, Tensor]:
        """{position: z} for the parameters of ``group`` (just ``only`` and what its groups
        need, if given), in the parameters' dtypes; a DTensor's z is a DTensor laid out
        like it, computed from the local shards (a collective where its groups are cut:
        every rank calls this)."""
        params = group["params"]
        points: dict[int, Tensor] = {}
        pending = []  # coupled members and cut shards: their prox needs the others' z
        for i, p in enumerate(params):
            grouping = effective_grouping(p.shape, group["grouping"])
            if only is not None and i != only and grouping != "coupled":
                continue
            state = self.state.get(p)
            if not state or float(state["step"]) == 0.0:
                points[i] = p.detach().clone()
                continue
            beta = state["step"].sqrt()
            dual = sharding.local(state["dual"])
            z = sharding.local(state["initial"]).to(dual.dtype) - dual / beta
            tau = group["lam"] * state["alpha"] / beta
            if grouping == "coupled" or sharding.cuts(p, grouping):
                pending.append((i, z, tau, grouping))
                continue
            if grouping != "none":
                group_prox_(z, tau, grouping)
            points[i] = sharding.like(p, z.to(p.dtype))
        if pending:
            ids, entries = self._reduce_numbering(group, [(i, g) for i, _, _, g in pending])
            shards = [params[i] for i, *_ in pending if sharding.is_sharded(params[i])]
            all_reduce = None if not shards else sharding.sum_across(
                sharding.reduce_group(shards, "RMDA: a param group"), "the group sums of z^2")
            coupled.coupled_prox_([z for _, z, _, _ in pending], ids,
                                  [tau for _, _, tau, _ in pending], entries,
                                  [g for *_, g in pending], all_reduce)
            for i, z, _, _ in pending:
                points[i] = sharding.like(params[i], z.to(params[i].dtype))
        return points

    @staticmethod
    def _reduce_numbering(group: dict[str, Any],
                          members: list[tuple[int, str]]) -> tuple[list[Tensor], Tensor]:
        """(group ids of each member's local groups, |G| per id) of a prox over groups
        that span tensors or shards: a coupled param group's ids, else each cut tensor's
        groups numbered in turn."""
        params = group["params"]
        if group["grouping"] == "coupled":
            ids = group["channel_groups"]
            return ([ids[i][sharding.local_groups(params[i], g)] for i, g in members],
                    coupled.coupled_entries(group))
        numbered = sharding.cut_groups([(params[i], g) for i, g in members])
        return ([ids[sharding.local_groups(params[i], g)]
                 for (i, g), (ids, _) in zip(members, numbered)],
                torch.cat([sizes for _, sizes in numbered]))

    # -- state_dict ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, after every load pre-hook: the state dict is checked against
        this optimizer (group count and sizes, hyper-parameters, each state entry's keys,
        shapes and dtypes) before anything changes, and the first mismatch is named. The
        live ``backend`` of each group is kept; V, t and A load in RMDA's state dtypes."""
        check = self.register_load_state_dict_pre_hook(_state_loading.check_and_wrap)
        try:
            super().load_state_dict(state_dict)
        finally:
            check.remove()
        self._plans.clear()
