"""``RMDA``: the torch.optim.Optimizer around :mod:`rmda_fused.functional`."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import functional
from .batch import StepBatch, StepOptions, state_dtype
from .grouping import GroupView, check_grouping, effective_grouping, group_prox_, group_view
from .structure import MASK_KEY, with_current_mask_key

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


class RMDA(torch.optim.Optimizer):
    r"""Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022, Algorithm 1).

    Args:
        params: parameters or param groups (dicts may set lr, momentum, lam, grouping).
        lr: the base step size; step t uses ``s_t = lr * sqrt(t)``.
        momentum: **c**, the weight of the new prox point in ``W <- (1-c) W + c z``,
            0 < c <= 1 (the authors use 0.1). Not SGD's 0.9.
        lam: regularization strength (group LASSO / L1), >= 0.
        grouping: ``"input_channel"``, ``"output_channel"``, ``"elementwise"`` (L1) or
            ``"none"``; see :mod:`rmda_fused.grouping`.
        backend: ``"auto"`` or a name from :func:`rmda_fused.available_backends`.

    The per-parameter state keys are ``initial``, ``dual``, ``step``, ``alpha`` and
    ``zero_mask`` (see ``STATE_KEYS`` in this module). ``restart()`` resets the dual
    averaging at W; ``apply_prox_point()`` sets every parameter to its exactly structured
    prox point z.
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.1,
        momentum: float = 0.1,
        lam: float = 0.0,
        grouping: str = "input_channel",
        backend: str = "auto",
        **unsupported: Any,
    ) -> None:
        self._reject_unsupported(unsupported)
        functional.check_backend_name(backend)
        defaults = dict(lr=lr, momentum=momentum, lam=lam, grouping=grouping, backend=backend)
        self._check_hyperparameters(defaults, where="RMDA")
        super().__init__(params, defaults)

    @staticmethod
    def _reject_unsupported(kwargs: dict[str, Any]) -> None:
        # optimizer factories (Hugging Face, timm) always pass weight_decay: 0 means none
        weight_decay = kwargs.pop("weight_decay", 0.0)
        if not (_is_number(weight_decay) and weight_decay == 0.0):
            raise ValueError(
                "RMDA has no weight_decay: the regularizer lam replaces it (weight_decay=0 is "
                f"accepted); got weight_decay={weight_decay!r}"
            )
        if kwargs:
            raise TypeError(f"RMDA got unexpected keyword arguments {sorted(kwargs)}")

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
        lr, momentum, lam = group["lr"], group["momentum"], group["lam"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        elif not _is_number(lr) or not 0.0 <= lr < math.inf:
            raise ValueError(f"{where}: invalid learning rate lr={lr!r} (must be a finite number >= 0)")
        if not _is_number(momentum) or not 0.0 < momentum <= 1.0:
            raise ValueError(
                f"{where}: invalid momentum={momentum!r}: RMDA's momentum is c, the weight of "
                "the new point, and must satisfy 0 < c <= 1 (the paper uses 0.1, not SGD's 0.9)"
            )
        if not _is_number(lam) or not 0.0 <= lam < math.inf:
            raise ValueError(f"{where}: invalid lam={lam!r} (must be a finite number >= 0)")
        try:
            check_grouping(group["grouping"])
            functional.check_backend_name(group["backend"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if "weight_decay" in group:
            RMDA._reject_unsupported({"weight_decay": group["weight_decay"]})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_new_group(self.param_groups[-1], len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def _check_new_group(self, group: dict[str, Any], index: int) -> None:
        self._check_hyperparameters(group, where=f"param group {index}")
        if isinstance(group["lr"], Tensor) and not 0.0 <= float(group["lr"]) < math.inf:
            # checked once here, not per step: reading a device lr would sync
            raise ValueError(f"param group {index}: invalid learning rate lr={group['lr']!r} "
                             "(must be finite and >= 0)")
        for i, p in enumerate(group["params"]):
            name = f"param group {index}, parameter {i}"
            if p.is_complex():
                raise TypeError(f"RMDA does not support complex parameters ({name}, shape {tuple(p.shape)})")
            if not p.is_floating_point():
                raise TypeError(f"RMDA needs floating-point parameters ({name} is {p.dtype})")

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
        elif MASK_KEY not in state or state[MASK_KEY].numel() != view.groups:
            state[MASK_KEY] = torch.zeros(view.groups, dtype=torch.bool, device=p.device)
        return state

    def _batches(self, group: dict[str, Any]) -> dict[str, tuple[StepBatch, list[int]]]:
        """The step batches of one param group, one per grouping its parameters take (1-D
        tensors take none in a channel grouping): every parameter that has a gradient, with
        each entry's position in ``group["params"]``."""
        entries: dict[str, tuple[list[tuple], list[int]]] = {}
        for position, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            grouping = effective_grouping(p.shape, group["grouping"])
            view = group_view(p.shape, grouping)
            state = self._state_for(p, grouping, view)
            if grouping not in entries:
                entries[grouping] = ([], [])
            rows, positions = entries[grouping]
            rows.append((p, grad, state["initial"], state["dual"], state["step"],
                         state["alpha"], state.get(MASK_KEY), view))
            positions.append(position)
        return {grouping: (StepBatch(*map(list, zip(*rows))), positions)
                for grouping, (rows, positions) in entries.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # every group is checked before any parameter or update state is written: a refused
        # step changes no value (it may only have created the state of new parameters)
        work = []
        for index, group in enumerate(self.param_groups):
            self._check_hyperparameters(group, where=f"param group {index}")
            for grouping, (batch, positions) in self._batches(group).items():
                options = StepOptions(group["lr"], group["momentum"], group["lam"], grouping,
                                      grad_scale, found_inf)
                functional.check_grads(
                    batch, lambda i: f"param group {index}, parameter {positions[i]}")
                work.append((batch, options, group["backend"]))
        for batch, options, backend in work:
            functional.step_batch_(batch, options, backend)
        return loss

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
        """z = prox(W0 - V/beta, lam*A/beta) for one parameter, rebuilt from its state.

        A parameter that has taken no step since the last restart has no z; its W is returned.
        """
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state.get(p)
        if not state or float(state["step"]) == 0.0:
            return p.detach().clone()
        beta = state["step"].sqrt()
        z = state["initial"].to(state["dual"].dtype) - state["dual"] / beta
        grouping = effective_grouping(p.shape, group["grouping"])
        if grouping != "none":
            group_prox_(z, group["lam"] * state["alpha"] / beta, grouping)
        return z.to(p.dtype)

    @torch.no_grad()
    def apply_prox_point(self) -> None:
        """Set every parameter to its prox point z: groups the prox zeroed become exactly 0."""
        for group in self.param_groups:
            for p in group["params"]:
                p.copy_(self.prox_point(p))

    # -- state_dict ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to the parameter's dtype; RMDA keeps V, t, A in
        # state_dtype and the zero mask as bool, so put the saved values back exactly.
        state_dict = with_current_mask_key(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) == len(params):  # else torch's loading names the mismatch
            _check_state_shapes(saved, ids, params)
        # the backend is a property of this machine, not of the run: keep the live choice
        backends = [g["backend"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, backend in zip(self.param_groups, backends):
            group["backend"] = backend
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            for key, value in saved[pid].items():
                if key == "initial":
                    dtype = p.dtype
                elif key == MASK_KEY:
                    dtype = torch.bool
                else:
                    dtype = state_dtype(p.dtype)
                self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)


def _check_state_shapes(saved: dict[Any, dict[str, Any]], ids: list[Any],
                        params: list[Tensor]) -> None:
    """Before anything is loaded: every saved W0 and V has its parameter's shape, t and A
    one element each (the step checks only gradients, so a wrong state must stop here)."""
    for index, (pid, p) in enumerate(zip(ids, params)):
        entry = saved.get(pid, {})
        for key, numel in (("initial", None), ("dual", None), ("step", 1), ("alpha", 1)):
            value = entry.get(key)
            if not isinstance(value, Tensor):
                continue
            if (value.shape != p.shape) if numel is None else (value.numel() != numel):
                want = tuple(p.shape) if numel is None else "one element"
                raise ValueError(
                    f"load_state_dict: state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, expected {want} (the parameter has shape "
                    f"{tuple(p.shape)})")
