"""``--fsdp`` checkpoints: one torch.distributed.checkpoint (DCP) directory per run.

``--output DIR/checkpoint.dcp/`` holds the model and optimizer state as DCP writes them
(``get_state_dict``: keyed by parameter name, each rank writing its own shards, plus
``.metadata``) and ``run.pt``, rank 0's file with the rest (:func:`checkpoint.run_state`:
epoch, arguments, scheduler, GradScaler, IdentificationTracker, every rank's RNG states).
DCP reshards on load, so a run on N processes resumes on any other number (one included);
the RNG streams then cannot be matched up and every process keeps the one it was seeded
with, as for a plain checkpoint. Every rank must see DIR (a shared filesystem across nodes).

Atomic like the single file: each epoch is written to ``.checkpoint.dcp.tmp``, then, by
rank 0, the previous directory is renamed ``.checkpoint.dcp.old``, the new one into its
place, and the old one removed. A run killed between the two renames leaves only
``.checkpoint.dcp.old``, which the next run renames back; other leftovers are removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed
from .distributed import Dist

DIRNAME = "checkpoint.dcp"
RUN_FILE = "run.pt"


def path(output: str | Path) -> Path:
    return Path(output) / DIRNAME


def _temporary(output: str | Path) -> Path:
    return Path(output) / f".{DIRNAME}.tmp"


def _previous(output: str | Path) -> Path:
    return Path(output) / f".{DIRNAME}.old"


def remove_temporaries(output: str | Path) -> list[Path]:
    """Finish or undo what a run killed while saving left (rank 0, before training);
    returns the directories removed."""
    final, previous, temporary = path(output), _previous(output), _temporary(output)
    if previous.exists() and not final.exists():  # killed between the two renames
        os.replace(previous, final)
    stale = [d for d in (previous, temporary) if d.exists()]
    for directory in stale:
        shutil.rmtree(directory)
    return stale


def _model_and_optimizer(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return dict(model=model_state, optimizer=optimizer_state)


def save(args: Any, info: Dist, epoch: int, model, optimizer, scheduler, scaler, tracker,
         num_classes: int) -> None:
    """Write the epoch's checkpoint; every rank calls it."""
    import torch.distributed.checkpoint as dcp

    output = args.output
    final, temporary = path(output), _temporary(output)
    rest = checkpoint.run_state(args, info, epoch, scheduler, scaler, tracker, num_classes)
    if info.is_main and temporary.exists():
        shutil.rmtree(temporary)
    distributed.barrier(info)
    error = None
    try:
        dcp.save(_model_and_optimizer(model, optimizer), checkpoint_id=temporary)
    except (Exception, dcp.CheckpointException) as exc:  # e.g. ENOSPC on any rank: DCP
        error = _cause(exc)                                # raises it on every rank
    if info.is_main and error is None:
        try:
            with open(temporary / RUN_FILE, "wb") as f:
                torch.save(rest, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
            if final.exists():
                os.replace(final, _previous(output))
            os.replace(temporary, final)
            shutil.rmtree(_previous(output), ignore_errors=True)
        except OSError as exc:
            error = exc
    # every rank gets rank 0's verdict; this also keeps them from going on (and, at the
    # next epoch, rewriting the temporary directory) before rank 0 has renamed it
    message = distributed.broadcast_object(info, None if error is None else _failure(
        final, error))
    if message:
        if info.is_main:
            shutil.rmtree(temporary, ignore_errors=True)  # it would only hold on to the space
        raise SystemExit(message)


def _cause(exc: BaseException) -> BaseException:
    """The error under a CheckpointException (which holds each failed rank's, with its
    traceback, in a message of many lines): the first rank's; any other as it is."""
    failures = getattr(exc, "failures", None)
    return next(iter(failures.values()))[0] if failures else exc


def _detail(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"


def _failure(final: Path, exc: BaseException) -> str:
    free = shutil.disk_usage(final.parent).free
    kept = f"{final.name} keeps the previous epoch" if final.exists() else "nothing saved"
    detail = _detail(exc)
    return (f"cannot write the checkpoint {final}: {detail} ({free / 2**20:,.0f} MiB free "
            f"there); {kept}")


def load(directory: Path, args: Any, num_classes: int) -> dict[str, Any]:
    """``run.pt`` of ``directory``, or SystemExit if it belongs to a different run."""
    file = directory / RUN_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(f"--resume: cannot read {file}: {type(exc).__name__}: {exc}") from None
    checkpoint.check_same_run(directory, state, args, num_classes)
    state["directory"] = directory
    return state


@torch.no_grad()
def restore(state: dict[str, Any], info: Dist, model, optimizer, scheduler, scaler,
            tracker) -> int:
    """Load the checkpoint into the live (sharded) objects, resharding onto this run's
    processes; returns the last finished epoch. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    # DCP loads into tensors laid out as this run's: get_state_dict creates the optimizer
    # state for them by a step with zero gradients and lr 0, which must not move the weights
    params = [p for p in model.parameters()]
    weights = [p.detach().clone() for p in params]
    target = _model_and_optimizer(model, optimizer)
    for p, w in zip(params, weights):
        p.copy_(w)
    try:
        dcp.load(target, checkpoint_id=state["directory"])
    except (Exception, dcp.CheckpointException) as exc:
        raise SystemExit(f"--resume: cannot read {state['directory']}: "
                         f"{_detail(_cause(exc))}") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])
    return checkpoint.restore_run_state(state, info, scheduler, scaler, tracker)
