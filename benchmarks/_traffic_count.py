"""The bytes the Triton kernels load and store, counted in Triton's interpreter, and the
check of benchmarks/traffic.py's model against them (``python -m benchmarks.traffic --check``).

Under TRITON_INTERPRET=1 every ``tl.load`` / ``tl.store`` of a kernel ends in
``interpreter_builder.create_masked_load`` / ``create_masked_store`` (the unmasked forms call
them too), and every launch goes through ``InterpretedFunction.run``. :class:`TrafficCounter`
wraps the three while it is entered and records, per launch, the addresses of the lanes left
unmasked and the byte size of each: the unique addresses read and written, and every load
(a band's second walk loads V and W0 again; each program of a tensor loads its t and A).
Atomics (the arrival counters) are not counted; the model bounds them with the tables. Addresses are named afterwards by memory region: the
tensors the caller names (parameters and their state) and the launch's own tensor arguments,
named by the kernel's argument names (meta, tiles, scratch, hyper, partial, ...).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .traffic import (
    ELEMENT_ROLES, GROUPINGS, LAM, STATE_ROLES, Pass, step_passes,
)

UNKNOWN = "unknown"  # an address in no named region: the check fails on any
ROLES = ELEMENT_ROLES + STATE_ROLES


def require_interpreter() -> None:
    """Raise unless the kernels were built for Triton's interpreter (counting needs it)."""
    from rmda_fused import kernels

    if not kernels.interpreted():
        raise RuntimeError(
            "counting loads and stores needs Triton's interpreter: TRITON_INTERPRET=1 must be "
            f"set before triton is imported (it is {os.environ.get('TRITON_INTERPRET')!r})")


class Regions:
    """Named address ranges (the storage of each tensor added); the first name of a range
    wins (the kernels receive ``hyper`` for an absent lr, grad_scale or found_inf too)."""

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[int, str]] = {}  # start -> (end, name)

    def add(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self._ranges:
            self._ranges[storage.data_ptr()] = (storage.data_ptr() + storage.nbytes(), name)

    def merged(self, other: Regions) -> Regions:
        out = Regions()
        out._ranges = {**other._ranges, **self._ranges}
        return out

    def bytes_by_name(self, accesses: dict[int, int]) -> Counter:
        """{address: size} summed per region name."""
        return self.bytes_by_name_of(
            np.fromiter(accesses, dtype=np.uint64, count=len(accesses)),
            np.fromiter(accesses.values(), dtype=np.int64, count=len(accesses)))

    def bytes_by_name_of(self, addresses: np.ndarray, sizes: np.ndarray) -> Counter:
        """The bytes of accesses (an address and a size each) summed per region name."""
        if not len(addresses):
            return Counter()
        starts = np.array(sorted(self._ranges), dtype=np.uint64)
        ends = np.array([self._ranges[s][0] for s in sorted(self._ranges)], dtype=np.uint64)
        names = [self._ranges[s][1] for s in sorted(self._ranges)] + [UNKNOWN]
        at = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
        inside = (at >= 0) & (addresses < ends[np.maximum(at, 0)])
        index = np.where(inside, at, len(starts))
        out = Counter()
        for i, total in enumerate(np.bincount(index, weights=sizes, minlength=len(names))):
            out[names[i]] += int(total)
        return +out


@dataclass
class LaunchCount:
    """One launch: its kernel, grid size, tensor arguments, the unique addresses it read
    and wrote ({address: access size in bytes}) and every load it made."""

    kernel: str
    programs: int
    arguments: Regions
    reads: dict[int, int] = field(default_factory=dict)
    writes: dict[int, int] = field(default_factory=dict)
    loads: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (addresses, size)

    def by_region(self, regions: Regions, direction: str) -> Counter:
        return regions.merged(self.arguments).bytes_by_name(getattr(self, direction))

    def loaded_by_region(self, regions: Regions) -> Counter:
        if not self.loads:
            return Counter()
        addresses = np.concatenate([a for a, _ in self.loads])
        sizes = np.concatenate([np.full(len(a), size, dtype=np.int64) for a, size in self.loads])
        return regions.merged(self.arguments).bytes_by_name_of(addresses, sizes)


class TrafficCounter:
    """``with TrafficCounter() as counter:`` records every launch in ``counter.launches``."""

    def __init__(self) -> None:
        require_interpreter()
        self.launches: list[LaunchCount] = []
        self._current: LaunchCount | None = None
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> TrafficCounter:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        self._patch(builder, "create_masked_load", self._counting_load)
        self._patch(builder, "create_masked_store", self._counting_store)
        self._patch(interpreter.InterpretedFunction, "run", self._counting_run)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, own in reversed(self._saved):
            if own is None:
                delattr(owner, name)  # the instance attribute goes: the class's method is back
            else:
                setattr(owner, name, own)
        self._saved.clear()

    def _patch(self, owner, name: str, wrap) -> None:
        self._saved.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, wrap(getattr(owner, name)))

    def _counting_run(self, run):
        counter = self

        def counting_run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            arguments = Regions()
            for name, value in [*zip(fn.arg_names, args), *kwargs.items()]:
                if isinstance(value, torch.Tensor):
                    arguments.add(name, value)
            counter._current = LaunchCount(fn.fn.__name__, int(np.prod(grid)), arguments)
            try:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter.launches.append(counter._current)
                counter._current = None

        return counting_run

    def _record(self, accesses: dict[int, int], ptrs, mask) -> tuple[np.ndarray, int]:
        # a mask may arrive as integers: as an index array it would pick lanes, not filter
        lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))
        addresses = np.asarray(ptrs.data).astype(np.uint64)[lanes]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        accesses.update(dict.fromkeys(np.unique(addresses).tolist(), size))
        return addresses, size

    def _counting_load(self, load):
        def counting_load(ptrs, mask, *args, **kwargs):
            if self._current is not None:
                self._current.loads.append(self._record(self._current.reads, ptrs, mask))
            return load(ptrs, mask, *args, **kwargs)

        return counting_load

    def _counting_store(self, store):
        def counting_store(ptrs, value, mask, *args, **kwargs):
            if self._current is not None:
                self._record(self._current.writes, ptrs, mask)
            return store(ptrs, value, mask, *args, **kwargs)

        return counting_store


# -- the check --------------------------------------------------------------------------------

def check_layers() -> nn.Sequential:
    """Small shapes that reach every path of the default tiles: 1x1, 3x3 and linear with
    odd sizes and biases (one walk, short runs side by side in a tile row), a 7x7 (runs in
    two pieces), a 7x7 with O = 70 (input_channel: 140 tile rows, two walks) and a 16x16
    patch conv with I*k*k = 2304 > 2048 (output_channel: two walks)."""
    return nn.Sequential(nn.Conv2d(6, 8, 1), nn.Conv2d(5, 7, 3), nn.Linear(11, 13),
                         nn.Conv2d(3, 9, 7, bias=False), nn.Conv2d(1, 70, 7, bias=False),
                         nn.Conv2d(9, 2, 16, bias=False))


# (BLOCK_R, BLOCK_L, BLOCK_G) as tests/kernels/test_rmda_grouped.py uses: tiles of 2 rows,
# so most bands of small shapes take two walks
TINY_TILE = (2, 16, 4)


def tiny_tile_layers() -> nn.Sequential:
    """Few programs with TINY_TILE, most bands walked twice in both channel groupings."""
    return nn.Sequential(nn.Conv2d(5, 7, 3, bias=False), nn.Linear(11, 13, bias=False),
                         nn.Conv2d(17, 3, 3, bias=False))


@dataclass
class CaseResult:
    name: str
    launches: tuple[int, int]  # (counted, model)
    element_bytes: tuple[int, int]  # per-pass sums over the roles, (counted, model)
    loaded_bytes: tuple[int, int]  # every load of the roles, re-reads included
    tables: tuple[int, int]  # per-pass table bytes, (counted, model's bound)
    step_dram: tuple[int, int]  # each address once per step (counted) vs the DRAM model
    numel: int
    mismatches: list[str]


def count_step(model: nn.Module, grouping: str, dtype: torch.dtype,
               seed: int = 0) -> tuple[list[LaunchCount], Regions, list[dict]]:
    """One RMDA step (backend triton) over ``model``'s parameters, counted."""
    from rmda_fused import RMDA, param_groups

    require_interpreter()
    gen = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    groups = param_groups(model, lam=LAM, grouping=grouping)
    optimizer = RMDA(groups, lr=0.01, momentum=0.1, backend="triton")
    with TrafficCounter() as counter:
        optimizer.step()
    regions = Regions()
    for p in model.parameters():
        regions.add("param", p)
        regions.add("grad", p.grad)
        for key, value in optimizer.state[p].items():
            regions.add(key, value)
    return counter.launches, regions, groups


def compare(name: str, launches: list[LaunchCount], regions: Regions, passes: list[Pass],
            numel: int) -> CaseResult:
    """Counted against modelled, per launch and per step (see benchmarks/traffic.py)."""
    bad = []
    if [(c.kernel, c.programs) for c in launches] != [(p.kernel, p.programs) for p in passes]:
        bad.append(f"launches (kernel, programs): counted "
                   f"{[(c.kernel, c.programs) for c in launches]}, model "
                   f"{[(p.kernel, p.programs) for p in passes]}")
    counted_elements = model_elements = counted_tables = table_bound = 0
    counted_loaded = model_loaded = 0
    step_read, step_written = {}, {}
    for i, (c, p) in enumerate(zip(launches, passes)):
        loaded = c.loaded_by_region(regions)
        for role in ROLES:
            if loaded[role] != p.loaded[role]:
                bad.append(f"launch {i} {c.kernel} every load of {role}: counted "
                           f"{loaded[role]} B, model {p.loaded[role]:g} B")
        counted_loaded += sum(loaded[r] for r in ROLES)
        model_loaded += sum(p.loaded[r] for r in ROLES)
        for direction, modelled, bound in (("reads", p.read, p.tables_read),
                                           ("writes", p.written, p.tables_written)):
            counted = c.by_region(regions, direction)
            for role in ROLES:
                if counted[role] != modelled[role]:
                    bad.append(f"launch {i} {c.kernel} {direction} {role}: counted "
                               f"{counted[role]} B, model {modelled[role]:g} B")
            tables = sum(v for k, v in counted.items() if k not in ROLES and k != UNKNOWN)
            if tables > bound or counted[UNKNOWN]:
                bad.append(f"launch {i} {c.kernel} {direction}: tables {tables} B (bound "
                           f"{bound} B), outside every region {counted[UNKNOWN]} B")
            counted_elements += sum(counted[r] for r in ROLES)
            model_elements += sum(modelled[r] for r in ROLES)
            counted_tables, table_bound = counted_tables + tables, table_bound + bound
        step_read.update(c.reads)
        step_written.update(c.writes)
    # each address once per step: what DRAM moves if every re-read hits L2 (shapes this
    # small fit it), against the model's DRAM bytes of the element arrays and the state
    step = regions.bytes_by_name(step_read) + regions.bytes_by_name(step_written)
    dram = sum((p.dram_read() for p in passes), Counter()) + sum(
        (p.written for p in passes), Counter())
    counted_step = sum(step[r] for r in ROLES)
    model_step = sum(dram[r] for r in ROLES)
    if counted_step != model_step:
        bad.append(f"step, each address once: counted {counted_step} B, model's DRAM "
                   f"estimate {model_step:g} B")
    return CaseResult(name, (len(launches), len(passes)), (counted_elements, model_elements),
                      (counted_loaded, model_loaded), (counted_tables, table_bound),
                      (counted_step, model_step), numel, bad)


def check_case(grouping: str, dtype: torch.dtype, l2_bytes: float,
               tile: tuple[int, int, int] | None = None) -> CaseResult:
    """Count one step over :func:`check_layers` and compare it with the model; with
    ``tile`` (BLOCK_R, BLOCK_L, BLOCK_G for both channel groupings instead of the
    defaults), over :func:`tiny_tile_layers`."""
    from rmda_fused.kernels import rmda_grouped

    saved = dict(rmda_grouped.TILES)
    if tile is not None:
        rmda_grouped.TILES.update(dict.fromkeys(saved, tile))
    try:
        layers = check_layers() if tile is None else tiny_tile_layers()
        launches, regions, groups = count_step(layers, grouping, dtype)
        passes = step_passes(groups, l2_bytes)
    finally:
        rmda_grouped.TILES.update(saved)
    numel = sum(p.numel() for g in groups for p in g["params"])
    name = f"{grouping}/{str(dtype).removeprefix('torch.')}" + (f"/tile {tile}" if tile else "")
    return compare(name, launches, regions, passes, numel)


def check_cases() -> list[tuple[str, torch.dtype, tuple[int, int, int] | None]]:
    cases = [(g, d, None) for g in GROUPINGS for d in (torch.float32, torch.bfloat16)]
    return cases + [(g, torch.float32, TINY_TILE) for g in ("input_channel", "output_channel")]


def _shapes(layers: nn.Module) -> str:
    return ", ".join(str(tuple(p.shape)) for p in layers.parameters())


def run_check(l2_bytes: float) -> bool:
    """Print counted against modelled bytes for every check case; True when all agree."""
    print("one optimizer step, counted in Triton's interpreter (bytes of unmasked lanes per "
          "launch: each address once, and every load) vs the model; shapes", _shapes(check_layers()), "(tile cases:",
          _shapes(tiny_tile_layers()) + ")")
    print(f"{'case':38s} {'launches':>9s}  {'elements+state B/elt':>20s}  "
          f"{'every load B/elt':>18s}  {'tables B (bound)':>18s}  {'step DRAM B/elt':>19s}")
    ok = True
    for grouping, dtype, tile in check_cases():
        r = check_case(grouping, dtype, l2_bytes, tile)

        def pair(counted: float, modelled: float, per: int = r.numel) -> str:
            sign = "=" if counted == modelled else "!="
            return f"{counted / per:.3f} {sign} {modelled / per:.3f}"

        tables = f"{r.tables[0]} {'<=' if r.tables[0] <= r.tables[1] else '>'} {r.tables[1]}"
        print(f"{r.name:38s} {pair(*r.launches, per=1).replace('.000', ''):>9s}  "
              f"{pair(*r.element_bytes):>20s}  {pair(*r.loaded_bytes):>18s}  {tables:>18s}  "
              f"{pair(*r.step_dram):>19s}")
        for line in r.mismatches:
            print("  DISAGREES:", line)
        ok = ok and not r.mismatches
    print("model and count agree" if ok else "model and count DISAGREE")
    return ok
