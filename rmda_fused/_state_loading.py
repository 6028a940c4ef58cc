"""How ``RMDA.load_state_dict`` checks a state dict and keeps RMDA's dtypes, on top of
torch's own loading.

torch casts every floating state tensor to its parameter's dtype (and a bool mask to a
float); RMDA keeps V, t and A in ``state_dtype`` (fp32 for bf16/fp16 parameters) and the
zero mask as bool. So the last load pre-hook, run after every hook of the caller, checks
the dict against the optimizer and wraps each state value in a :class:`_Exact`, which
torch's cast leaves alone; the first load post-hook, run before every hook of the caller,
unwraps them in RMDA's dtypes. Hooks of the caller see and edit ordinary tensors, and their
edits survive.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .batch import state_dtype
from .coupled import check_channel_groups
from .grouping import effective_grouping, group_view
from .sharding import laid_out_like, local
from .structure import MASK_KEY, with_current_mask_key

if TYPE_CHECKING:
    from .optimizer import RMDA

_HYPER_KEYS = ("lr", "momentum", "lam", "grouping")
_REQUIRED_STATE = ("initial", "dual", "step", "alpha")


class _Exact:
    """A state value on its way through torch's loading, which copies it as it is."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def check_and_wrap(optimizer: RMDA, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load pre-hook (registered last, per load): refuse a state dict that does not fit
    ``optimizer`` before anything changes, naming the first mismatch; else the dict with
    the live backend in each group and every state value wrapped."""
    state_dict = with_current_mask_key(state_dict)
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups)):
        return state_dict  # torch refuses it, in its own words, before changing anything
    new_groups = []
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        missing = [key for key in _HYPER_KEYS if key not in saved]
        if missing:
            raise ValueError(
                f"load_state_dict: param group {index} of the loaded state dict has no "
                f"{', '.join(map(repr, missing))} (it holds {sorted(k for k in saved if k != 'params')}): "
                "not an RMDA state dict")
        # the backend is a property of this machine, not of the run: keep the live choice
        loaded = {**saved, "backend": group["backend"]}
        where = f"load_state_dict: param group {index}"
        optimizer._check_hyperparameters(loaded, where)
        optimizer._check_switches(loaded, where)
        check_channel_groups({**loaded, "params": group["params"]}, where)
        new_groups.append(loaded)
    saved_state = state_dict["state"]
    index = 0
    for saved, group in zip(new_groups, groups):
        for pid, p in zip(saved["params"], group["params"]):
            if pid in saved_state:
                _check_entry(saved_state[pid], p, saved["grouping"], index)
            index += 1
    known = {pid for saved in new_groups for pid in saved["params"]}
    state = {pid: {key: _Exact(value) for key, value in entry.items()} if pid in known else entry
             for pid, entry in saved_state.items()}
    return {**state_dict, "param_groups": new_groups, "state": state}


def _check_entry(entry: Any, p: Tensor, grouping: str, index: int) -> None:
    where = f"load_state_dict: state of parameter {index} (shape {tuple(p.shape)})"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
    missing = [key for key in _REQUIRED_STATE if key not in entry]
    unknown = sorted(set(entry) - {*_REQUIRED_STATE, MASK_KEY})
    if missing or unknown:
        raise ValueError(f"{where} has keys {sorted(entry)}; RMDA's are {list(_REQUIRED_STATE)} "
                         f"and {MASK_KEY!r} (missing {missing}, unknown {unknown})")
    for key in ("initial", "dual"):
        value = entry[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{where}: {key!r} must be a floating-point tensor, got "
                            f"{_describe(value)}")
        if value.shape != p.shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}")
    for key in ("step", "alpha"):
        value = entry[key]
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{where}: {key!r} must be one real number, got {_describe(value)}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{where}: {key!r} must be a number or a one-element tensor, got "
                            f"{_describe(value)}")
    if MASK_KEY in entry:
        view = group_view(p.shape, effective_grouping(p.shape, grouping))
        mask = entry[MASK_KEY]
        groups = 0 if view is None else view.groups
        if not isinstance(mask, Tensor) or mask.numel() != groups:
            raise ValueError(f"{where}: {MASK_KEY!r} must hold one entry per group of grouping "
                             f"{grouping!r} ({groups}), got {_describe(mask)}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def unwrap(optimizer: RMDA) -> None:
    """Load post-hook (registered first): the wrapped values as state tensors in RMDA's
    dtypes, copied (never aliasing the caller's dict), on each parameter's device except
    ``step``, which stays where it was saved, as torch's loading keeps it; the next step
    moves it (``optimizer._steps_elsewhere``), since the kernels read t on the device."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p)
            if not entry:
                continue
            for key, value in entry.items():
                if isinstance(value, _Exact):
                    entry[key] = _as_state(key, value.value, p)
            if MASK_KEY in entry and effective_grouping(p.shape, group["grouping"]) == "none":
                del entry[MASK_KEY]
            if "step" in entry and entry["step"].device != p.device:
                optimizer._steps_elsewhere = True


def _as_state(key: str, value: Any, p: Tensor) -> Tensor:
    if key == "initial":
        dtype = p.dtype
    elif key == MASK_KEY:
        dtype = torch.bool
    else:
        dtype = state_dtype(p.dtype)
    if not isinstance(value, Tensor):  # a step or alpha saved as a Python number
        return torch.tensor(value, dtype=dtype, device=p.device)
    if key in ("step", "alpha"):
        value = local(value).reshape(())  # replicated: every rank holds the same
    elif key in ("initial", "dual"):  # e.g. a single-process state dict for DTensors
        value = laid_out_like(p, value)
    device = value.device if key == "step" else p.device
    return value.to(device=device, dtype=dtype, copy=True)
