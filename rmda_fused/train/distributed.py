"""Process-group setup for one process or a ``torchrun`` launch (single- or multi-node).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT); without them the run is a
single process and no process group is created, so ``python -m rmda_fused.train`` needs no
launcher. NCCL on GPUs, gloo on CPU. Joining and every collective wait at most
``--timeout-min`` for the other processes: a process that hangs ends the job instead of
stalling it (gloo raises, which :func:`timeouts_end_the_job` turns into one line; NCCL's
watchdog ends the process with its own message).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_kind: str, timeout_min: float, fsdp: bool = False) -> Dist:
    """Join the process group torchrun describes (if any) and pick this process's device.
    ``fsdp``: FSDP2 needs a process group even for one process: it gets one of its own."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or fsdp) and not dist.is_initialized():
        alone = dict(store=dist.HashStore(), rank=0, world_size=1) if world_size == 1 else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=timeout_min), **alone)
    return Dist(rank, world_size, local_rank, device)


@contextmanager
def timeouts_end_the_job(timeout_min: float) -> Iterator[None]:
    """SystemExit with one line when waiting for the other processes timed out (joining the
    group, or in a collective), instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as exc:  # gloo raises a plain RuntimeError, the c10d store a DistError
        if not (isinstance(exc, dist.DistError) or "timed out" in str(exc).lower()):
            raise
        detail = str(exc).strip().splitlines()[0]
        rank = os.environ.get("RANK", "0")
        raise SystemExit(f"rank {rank}: waiting for the other processes failed ({detail}): one "
                         f"of them hung longer than --timeout-min {timeout_min:g}, failed or was "
                         "killed; its own output says which") from None


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: Dist, values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (one collective)."""
    if not info.enabled:
        return values
    # gloo reduces CPU tensors, NCCL device tensors: put them where the backend wants them
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(info: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (e.g. a decision only rank 0 could make)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state(info: Dist) -> dict[str, Any]:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if info.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(info.device)
    return state


def gather_rng_states(info: Dist) -> list[dict[str, Any]]:
    """Every process's RNG states (augmentation, dropout and worker seeds draw from them), so
    that a resumed run continues each process's random stream where the checkpoint left it."""
    mine = rng_state(info)
    if not info.enabled:
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(info: Dist, state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and info.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), info.device)
