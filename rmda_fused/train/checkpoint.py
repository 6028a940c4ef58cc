"""One checkpoint per run directory, replaced atomically at the end of every epoch.

``--output DIR/checkpoint.pt`` holds everything a resumed run needs to continue as if never
stopped: model, optimizer (RMDA's W0, V, t, A), scheduler (restart and momentum schedule),
GradScaler, IdentificationTracker, every process's RNG states, the epoch, and the run's
arguments (those in ``FIXED_ON_RESUME`` are checked on resume). A run killed mid-epoch loses
that epoch only: the file is written to a temporary name and renamed, so it is always whole;
the temporary file a kill during the write leaves behind is removed by the next run and
after every save. The training loop saves only epochs whose loss, weights and optimizer
state are finite, so the checkpoint is always the last good epoch.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .distributed import Dist

FILENAME = "checkpoint.pt"
# what must match between the run that wrote a checkpoint and the run resuming it: what the
# run is, and its recipe (a new value would apply only in part: the optimizer's param groups
# and the scheduler's state carry the old lr, c, lam and milestones)
FIXED_ON_RESUME = ("arch", "data", "optimizer", "grouping", "lr", "momentum", "momentum_schedule",
                   "lam", "milestones", "gamma", "label_smoothing", "weight_decay", "batch_size",
                   "image_size", "seed")


def path(output: str | Path) -> Path:
    return Path(output) / FILENAME


def _temporary(output: str | Path, pid: int | str) -> Path:
    return path(output).with_name(f".{FILENAME}.{pid}.tmp")


def remove_temporaries(output: str | Path) -> list[Path]:
    """Remove the temporary checkpoint files in ``output`` (one is left by a process killed
    while writing); returns them. Only rank 0 writes checkpoints, so none is another's."""
    stale = sorted(Path(output).glob(_temporary(output, "*").name))
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def save(output: str | Path, payload: dict[str, Any]) -> None:
    final = path(output)
    temporary = _temporary(output, os.getpid())
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(temporary, final)
    except OSError as exc:  # e.g. ENOSPC: a full disk
        temporary.unlink(missing_ok=True)  # a partial file would only hold on to the space
        free = shutil.disk_usage(final.parent).free
        kept = f"{final.name} keeps the previous epoch" if final.exists() else "nothing saved"
        raise SystemExit(f"cannot write the checkpoint {final}: {exc.strerror or exc} "
                         f"({free / 2**20:,.0f} MiB free there); {kept}") from None
    remove_temporaries(output)


def payload(args: Any, info: Dist, epoch: int, model, optimizer, scheduler, scaler, tracker,
            num_classes: int) -> dict[str, Any]:
    """What :func:`save` writes; collective (every process's RNG states are gathered)."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                **run_state(args, info, epoch, scheduler, scaler, tracker, num_classes))


def run_state(args: Any, info: Dist, epoch: int, scheduler, scaler, tracker,
              num_classes: int) -> dict[str, Any]:
    """Everything in a checkpoint but the model and optimizer; collective (RNG states)."""
    return dict(epoch=epoch, args=vars(args), num_classes=num_classes,
                world_size=info.world_size, scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), tracker=tracker.state_dict(),
                rng=distributed.gather_rng_states(info))


def load(file: Path, args: Any, info: Dist, num_classes: int) -> dict[str, Any]:
    """The checkpoint in ``file``, or SystemExit if it belongs to a different run."""
    try:
        # our own file, with Python RNG states and arguments in it: not weights-only
        state = torch.load(file, map_location=info.device, weights_only=False)
    except Exception as exc:
        raise SystemExit(f"--resume: cannot read {file}: {type(exc).__name__}: {exc}") from None
    check_same_run(file, state, args, num_classes)
    return state


def check_same_run(file: Path, state: dict[str, Any], args: Any, num_classes: int) -> None:
    """SystemExit if the checkpoint ``state`` read from ``file`` belongs to a different run."""
    saved = state.get("args", {})
    changed = [f"--{key.replace('_', '-')} {saved.get(key)} (this run: {getattr(args, key)})"
               for key in FIXED_ON_RESUME if saved.get(key) != getattr(args, key)]
    if changed:
        raise SystemExit(f"--resume: {file} was written by a run with {'; '.join(changed)}. A "
                         "resumed run keeps the values it started with: pass those, or start a "
                         "new run with another --output")
    if state["num_classes"] != num_classes:
        raise SystemExit(f"--resume: {file} has {state['num_classes']} classes, the data "
                         f"{args.data} has {num_classes}")


def restore(state: dict[str, Any], info: Dist, model, optimizer, scheduler, scaler, tracker) -> int:
    """Load ``state`` into the live objects; returns the last finished epoch."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return restore_run_state(state, info, scheduler, scaler, tracker)


def restore_run_state(state: dict[str, Any], info: Dist, scheduler, scaler, tracker) -> int:
    """Load what is not model or optimizer; returns the last finished epoch."""
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    tracker.load_state_dict(state["tracker"])
    rng = state["rng"]
    # with the same number of processes each continues its own random stream; otherwise
    # the streams cannot be matched up and every process keeps the one it was seeded with
    if len(rng) == info.world_size:
        distributed.set_rng_state(info, rng[info.rank])
    return int(state["epoch"])
