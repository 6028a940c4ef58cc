"""Running a test body on 2 CPU processes over gloo, for tests/test_sharded.py.

:class:`Ranks` spawns the processes once (torch.multiprocessing), each joining one process
group through a rendezvous file with a short timeout, runs the bodies the tests hand it on
every rank, and fails the test with each failing rank's traceback. :func:`start_ranks`
starts processes of their own for a test that kills one. The bodies live in test_sharded.py; this module holds what they share: the
problems (parameters and gradient directions that zero some groups and keep others) and
the comparisons with a single-process run.
"""
from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT = timedelta(seconds=20)  # a dead peer ends a collective with an error, not a hang


def _init(rank: int, init_file: str, timeout: timedelta) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timeout)


def _entry(rank: int, body, init_file: str, args: tuple, timeout: timedelta = TIMEOUT) -> None:
    _init(rank, init_file, timeout)
    try:
        body(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _serve(rank: int, init_file: str, inbox, outbox) -> None:
    """A rank of :class:`Ranks`: runs each body it is sent, answers with None or the
    traceback of its failure."""
    _init(rank, init_file, TIMEOUT)
    for body, args in iter(inbox.get, None):
        try:
            body(rank, *args)
            dist.barrier()
            outbox.put((rank, None))
        except BaseException:  # noqa: BLE001 - the traceback travels to the test
            outbox.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """WORLD processes in one process group, started once and reused by the tests (starting
    them costs seconds: each imports torch); a failure starts fresh ones for the next."""

    def __init__(self) -> None:
        self._procs: list = []
        self._inboxes: list = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._tmp.name, "rendezvous")
        self._outbox = context.Queue()
        self._inboxes = [context.Queue() for _ in range(WORLD)]
        self._procs = [context.Process(target=_serve, daemon=True,
                                       args=(rank, init_file, inbox, self._outbox))
                       for rank, inbox in enumerate(self._inboxes)]
        for proc in self._procs:
            proc.start()

    def run(self, body, *args, timeout: float = 120.0) -> None:
        """``body(rank, *args)`` on every rank; any rank's failure fails the caller."""
        if not self._procs:
            self._start()
        for inbox in self._inboxes:
            inbox.put((body, args))
        failures = []
        try:
            for _ in range(WORLD):
                rank, failure = self._outbox.get(timeout=timeout)
                if failure is not None:
                    failures.append(f"rank {rank}:\n{failure}")
        except queue.Empty:
            failures.append(f"no answer from every rank within {timeout} s")
        if failures:
            self.close()
            raise AssertionError("\n".join(failures))

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._procs, self._inboxes = [], []
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()


def start_ranks(body, *args, timeout: timedelta = TIMEOUT) -> list:
    """The processes of ``body(rank, *args)``, started and not joined (a test that kills
    one of them watches the others end); ``timeout`` is the process group's."""
    tmp = tempfile.mkdtemp()
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(rank, body, os.path.join(tmp, "rendezvous"),
                                                  args, timeout)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    return procs


def mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


# odd sizes, a 1x1 conv, a linear layer, a bias, and a tensor one of whose dims has fewer
# rows than ranks (rank 1's shard of it is empty under Shard(0))
SHAPES = [(6, 5, 3, 3), (5, 4, 1, 1), (7, 5), (7,), (1, 3)]


def problem(shapes, lam: float, seed: int = 0):
    """(initial values, gradient directions): per row and per column a level among 0
    (noise only: that group ends zero), small and large, so every grouping has groups that
    end zero and groups that do not."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.3, 2.5])
    values, directions = [], []
    for shape in shapes:
        values.append(0.3 * torch.randn(shape, generator=gen))
        rows = levels[torch.randint(0, 3, (shape[0],), generator=gen)]
        if len(shape) < 2:
            strength = rows
        else:
            cols = levels[torch.randint(0, 3, (shape[1],), generator=gen)]
            strength = (rows[:, None] * cols[None, :]).reshape(shape[:2] + (1,) * (len(shape) - 2))
        sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        directions.append(lam * strength * sign * torch.ones(shape))
    return values, directions


def noisy(directions, gen):
    return [d + 0.3 * torch.randn(d.shape, generator=gen) for d in directions]


def local_part(full: torch.Tensor, like) -> torch.Tensor:
    """The part of ``full`` that the DTensor ``like`` holds on this rank."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def full_mask(mask) -> torch.Tensor:
    from rmda_fused.sharding import full
    return full(mask).reshape(-1)


def assert_state_matches(opt, params, ref, ref_params, tol: float = 1e-6) -> None:
    """Every local shard of W and V within ``tol`` of the single-process run's, and every
    zero mask (gathered) equal; t and A equal."""
    from rmda_fused.sharding import is_sharded, local
    for i, (p, q) in enumerate(zip(params, ref_params)):
        name = f"param {i} {tuple(p.shape)} {p.placements if is_sharded(p) else ''}"
        mine, theirs = opt.state[p], ref.state[q]
        for what, x, y in (("W", p, q), ("V", mine["dual"], theirs["dual"]),
                           ("W0", mine["initial"], theirs["initial"])):
            expected = local_part(y.detach(), x) if is_sharded(x) else y.detach()
            torch.testing.assert_close(local(x.detach()), expected, rtol=0, atol=tol,
                                       msg=lambda m: f"{name} {what}: {m}")
        for key in ("step", "alpha"):
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=0)
        assert ("zero_mask" in mine) == ("zero_mask" in theirs), name
        if "zero_mask" in mine:
            assert torch.equal(full_mask(mine["zero_mask"]), theirs["zero_mask"]), name


def assert_runs_on(opt, backend: str) -> None:
    """Every route of every step plan runs on ``backend``: the local shards take the fused
    kernels, no fallback to 'reference'."""
    for plan in opt._plans.values():
        names = {route[2] for route in plan.routes}
        if plan.coupled is not None:
            names |= {r.name for r in plan.coupled.routes}
        assert names <= {backend}, names
