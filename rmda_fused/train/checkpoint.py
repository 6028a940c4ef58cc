"""One checkpoint per run directory, replaced atomically at the end of every epoch.

``--output DIR/checkpoint.pt`` holds everything a resumed run needs to continue as if never
stopped: model, optimizer (RMDA's W0, V, t, A), scheduler (restart and momentum schedule),
GradScaler, IdentificationTracker, every process's RNG states, the epoch, and the run's
arguments (arch and optimizer are checked on resume). A run killed mid-epoch loses that
epoch only: the file is written to a temporary name and renamed, so it is always whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .distributed import Dist

FILENAME = "checkpoint.pt"
# what must match between the run that wrote a checkpoint and the run resuming it
IDENTITY = ("arch", "data", "optimizer", "grouping")


def path(output: str | Path) -> Path:
    return Path(output) / FILENAME


def save(output: str | Path, payload: dict[str, Any]) -> None:
    final = path(output)
    temporary = final.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(temporary, final)


def payload(args: Any, info: Dist, epoch: int, model, optimizer, scheduler, scaler, tracker,
            num_classes: int) -> dict[str, Any]:
    """What :func:`save` writes; collective (every process's RNG states are gathered)."""
    return dict(
        epoch=epoch, args=vars(args), num_classes=num_classes, world_size=info.world_size,
        model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
        tracker=tracker.state_dict(), rng=distributed.gather_rng_states(info),
    )


def load(file: Path, args: Any, info: Dist, num_classes: int) -> dict[str, Any]:
    """The checkpoint in ``file``, or SystemExit if it belongs to a different run."""
    try:
        # our own file, with Python RNG states and arguments in it: not weights-only
        state = torch.load(file, map_location=info.device, weights_only=False)
    except Exception as exc:
        raise SystemExit(f"--resume: cannot read {file}: {type(exc).__name__}: {exc}") from None
    saved = state.get("args", {})
    for key in IDENTITY:
        if saved.get(key) != getattr(args, key):
            raise SystemExit(
                f"--resume: {file} was written by a run with --{key.replace('_', '-')} "
                f"{saved.get(key)}, this run has --{key.replace('_', '-')} {getattr(args, key)}; "
                "use the same value, or another --output for a new run")
    if state["num_classes"] != num_classes:
        raise SystemExit(f"--resume: {file} has {state['num_classes']} classes, the data "
                         f"{args.data} has {num_classes}")
    return state


def restore(state: dict[str, Any], info: Dist, model, optimizer, scheduler, scaler, tracker) -> int:
    """Load ``state`` into the live objects; returns the last finished epoch."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    tracker.load_state_dict(state["tracker"])
    rng = state["rng"]
    # with the same number of processes each continues its own random stream; otherwise
    # the streams cannot be matched up and every process keeps the one it was seeded with
    if len(rng) == info.world_size:
        distributed.set_rng_state(info, rng[info.rank])
    return int(state["epoch"])
