"""DRAM bytes per parameter element and launches per step of the Triton backend, modelled
from the kernels' own work plans, and checked against the loads and stores they make.

    python -m benchmarks.traffic resnet50 [--json PATH] [--l2-mb 50]
    python -m benchmarks.traffic --check

The table is a model, not a measurement. Per param group (as rmda_fused.param_groups builds
them) and dtype bucket, the launch and its grid come from the wrappers' planners
(``rmda_grouped.plan`` with ``rmda_grouped.TILES`` and its band budget,
``rmda_elementwise._tiles`` with its BLOCK); which element arrays each kind of program reads
and writes is read off the kernel bodies (``READS``/``WRITES``/``REREADS`` below). DRAM model:

- the step starts with none of its tensors in L2; every byte written reaches DRAM once;
  stores cover whole sectors (no read for ownership); bytes, not 32-byte sectors, are
  counted (a band's short runs share sectors with the neighbouring bands, which the
  neighbouring programs walk at the same time);
- a walk reads each address it touches once (what --check counts);
- a band too large for one tile is walked twice by its program, the second walk re-reading
  V and W0. That re-read is served by the L2 when the band fits the L2 model that sized the
  bands (kernels/rmda_grouped.py: ``rmda_grouped.PROGRAMS`` bands in flight, each holding V,
  W0 and W, within ``L2_SHARE`` of the L2; ``--l2-mb`` sets the L2 here, 50 MB by default:
  H100 SXM and H200); a larger band re-reads them from DRAM;
- the launches' own tables (meta rows, task/tile tables, arrival counters, hyper parameters
  and AMP scalars) are counted whole, once per launch: an upper bound.

``--check`` runs optimizer steps on small shapes in Triton's interpreter, counts the bytes the
kernels load (once per address, and every load) and store (benchmarks/_traffic_count.py)
and compares them with this model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

if __name__ == "__main__" and "--check" in sys.argv:
    # before rmda_fused imports triton: the check runs the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rmda_fused import param_groups  # noqa: E402
from rmda_fused.batch import StepBatch, state_dtype  # noqa: E402
from rmda_fused.grouping import effective_grouping, group_view  # noqa: E402
from rmda_fused.kernels import _common, rmda_elementwise, rmda_grouped  # noqa: E402

L2_MB = rmda_grouped.L2_BYTES / 1e6  # H100 SXM and H200 (../shared/GPU_NOTES.md)
GROUPINGS = ("input_channel", "output_channel", "elementwise", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_BYTES = {"fp32": 25, "bf16": 17}  # per element, bf16 params with fp32 state
TARGET_LAUNCHES = 2
LAM = 1e-4  # > 0: every regularized tensor takes its prox

ELEMENT_ROLES = ("grad", "param", "initial", "dual")
STATE_ROLES = ("step", "alpha", "zero_mask")
# Which element arrays each kind of program reads and writes, as the kernel bodies in
# kernels/ do: the plans do not say (--check counts it). A band's second walk re-reads
# REREADS; t and A are read by every program of a tensor and written by one; the zero
# mask is counted apart (per element for L1, per group for channel groups).
READS = {"elementwise": ("grad", "dual", "initial", "param"),
         "band": ("grad", "dual", "initial", "param")}
WRITES = {"elementwise": ("dual", "param"), "band": ("dual", "param")}
REREADS = ("dual", "initial")
HYPER_BYTES = 4 * 8  # _common.Hyper: lr, c, 1 - c, lam in fp64
AMP_SCALAR_BYTES = 3 * 8  # at most: a tensor lr, grad_scale, found_inf
COUNTER_BYTES = 4  # one int32 arrival counter per tensor


@dataclass
class Pass:
    """One launch: its kernel, its grid, and per role the bytes it reads (each address
    once), loads (every load, re-reads included) and writes. ``l2_served``: of the
    re-reads, what the L2 model serves."""

    kernel: str
    programs: int
    read: Counter = field(default_factory=Counter)
    loaded: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    l2_served: Counter = field(default_factory=Counter)
    two_walk_elements: int = 0
    tables_read: int = 0  # upper bounds (module docstring)
    tables_written: int = 0

    def dram_read(self) -> Counter:
        """Each address once, plus the re-reads the L2 does not serve."""
        rereads = Counter({r: self.loaded[r] - self.read[r] for r in ELEMENT_ROLES})
        return self.read + (rereads - self.l2_served)

    def as_dict(self) -> dict:
        return dict(kernel=self.kernel, programs=self.programs, read=dict(self.read),
                    loaded=dict(self.loaded), written=dict(self.written),
                    l2_served=dict(self.l2_served), two_walk_elements=self.two_walk_elements,
                    tables_read=self.tables_read, tables_written=self.tables_written)


def _name(kernel) -> str:
    return kernel.fn.__name__


def _sizes(batch: StepBatch) -> dict[str, int]:
    """Bytes per element of each role in a one-bucket batch."""
    return dict(param=batch.params[0].element_size(), grad=batch.grads[0].element_size(),
                initial=batch.initials[0].element_size(), dual=batch.duals[0].element_size(),
                zero_mask=1)


def _element_bytes(elements: float, roles: tuple[str, ...], sizes: dict[str, int]) -> Counter:
    return Counter({role: elements * sizes[role] for role in roles})


def _scalars(batch: StepBatch, programs: int) -> tuple[Counter, Counter, Counter]:
    """(read once, loaded, written) bytes of t and A: every program loads its tensor's, the
    last to arrive writes them."""
    n, f = len(batch), _sizes(batch)["dual"]
    once = Counter(step=n * f, alpha=n * f)
    return once, Counter(step=programs * f, alpha=programs * f), Counter(once)


def _tables(batch: StepBatch, work_table_bytes: int) -> tuple[int, int]:
    """(read, written) bound of a launch's tables: meta rows, its work table, the arrival
    counters (reset by each tensor's last program), hyper parameters and AMP scalars."""
    n = len(batch)
    counters = n * COUNTER_BYTES
    return (n * _common.NCOL.value * 8 + work_table_bytes + counters + HYPER_BYTES
            + AMP_SCALAR_BYTES, counters)


def elementwise_passes(batch: StepBatch, prox: bool) -> list[Pass]:
    sizes, block = _sizes(batch), rmda_elementwise.BLOCK
    numels = tuple(p.numel() for p in batch.params)
    tiles = rmda_elementwise._tiles(numels, block)  # (tensor, first element) per program
    covered = int((torch.tensor(numels, dtype=torch.int64)[tiles[:, 0]] - tiles[:, 1])
                  .clamp(min=0, max=block).sum())
    once, loaded, written = _scalars(batch, len(tiles))
    tables_read, tables_written = _tables(batch, tiles.numel() * 8)
    element = Pass(_name(rmda_elementwise._rmda_elementwise_kernel), len(tiles),
                   read=_element_bytes(covered, READS["elementwise"], sizes) + once,
                   loaded=_element_bytes(covered, READS["elementwise"], sizes) + loaded,
                   written=_element_bytes(covered, WRITES["elementwise"], sizes) + written,
                   tables_read=tables_read, tables_written=tables_written)
    if prox:  # L1: one mask byte per element
        element.written["zero_mask"] = covered
    return [element]


def grouped_passes(batch: StepBatch, grouping: str, l2_bytes: float) -> list[Pass]:
    """The launch of one channel-grouped bucket: its bands as rmda_grouped.plan cuts them
    (sized by the kernels' L2 model), one walk or two as rmda_grouped.band_layout says, and
    the second walk's re-reads served by an L2 of ``l2_bytes`` when the band fits it."""
    sizes = _sizes(batch)
    block_r, block_l, block_g = rmda_grouped.TILES[grouping]
    dims, tasks = rmda_grouped.plan(tuple(tuple(v) for v in batch.views), block_l, block_g,
                                    rmda_grouped.bucket_band_budget(batch))
    fits = rmda_grouped.bucket_band_budget(batch, l2_bytes)
    elements = two_walk = served = groups = 0
    for tensor, _, n_groups, _ in tasks:
        outer, _, inner, _ = dims[tensor]
        band = outer * n_groups * inner
        elements, groups = elements + band, groups + n_groups
        if rmda_grouped.band_layout(outer, inner, n_groups, block_l)[-1] > block_r:
            two_walk += band
            served += band if band <= fits else 0
    once, loaded, written = _scalars(batch, len(tasks))
    tables_read, tables_written = _tables(batch, len(tasks) * rmda_grouped.TCOL.value * 8)
    band = Pass(_name(rmda_grouped._rmda_grouped_kernel),
                min(len(tasks), rmda_grouped.PROGRAMS),
                read=_element_bytes(elements, READS["band"], sizes) + once,
                loaded=(_element_bytes(elements, READS["band"], sizes)
                        + _element_bytes(two_walk, REREADS, sizes) + loaded),
                written=_element_bytes(elements, WRITES["band"], sizes) + written,
                l2_served=_element_bytes(served, REREADS, sizes), two_walk_elements=two_walk,
                tables_read=tables_read, tables_written=tables_written)
    band.written["zero_mask"] = groups
    return [band]


def step_batches(groups: list[dict]) -> list[tuple[str, StepBatch]]:
    """(effective grouping, one-bucket batch) in the order ``RMDA.step()`` hands them to the
    Triton backend: param groups in order; in each, one batch per effective grouping (1-D
    tensors take "none" in a channel grouping) in order of first appearance; in each, one
    bucket per dtype combination (``StepBatch.buckets``). Every parameter is taken to have
    a gradient. The tensors are on the meta device: the plans read shapes and dtypes only."""
    out = []
    for group in groups:
        rows: dict[str, list[tuple]] = {}
        for p in group["params"]:
            grouping = effective_grouping(p.shape, group["grouping"])
            view = group_view(p.shape, grouping)
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            acc = state_dtype(p.dtype)
            rows.setdefault(grouping, []).append((
                meta, torch.empty_like(meta), torch.empty_like(meta),
                torch.empty_like(meta, dtype=acc), torch.empty((), dtype=acc, device="meta"),
                torch.empty((), dtype=acc, device="meta"),
                None if view is None else torch.empty(view.groups, dtype=torch.bool,
                                                      device="meta"), view))
        for grouping, entries in rows.items():
            batch = StepBatch(*map(list, zip(*entries)))
            out += [(grouping, bucket) for _, bucket in batch.buckets()]
    return out


def step_passes(groups: list[dict], l2_bytes: float) -> list[Pass]:
    """The launches of one optimizer step over ``groups``, in order (every bucket has at
    least one program: an empty tensor's advances its t and A)."""
    passes = []
    for grouping, batch in step_batches(groups):
        if grouping in ("none", "elementwise"):
            passes += elementwise_passes(batch, prox=grouping == "elementwise")
        else:
            passes += grouped_passes(batch, grouping, l2_bytes)
    return passes


def sgd_bytes(dtype: torch.dtype) -> int:
    """torch's fused momentum SGD per element: read p, g, buf; write p, buf (all in the
    parameter's dtype)."""
    return 5 * torch.empty((), dtype=dtype).element_size()


def rmda_floor(dtype: torch.dtype) -> int:
    """RMDA's least traffic per element: read g, W, W0, V; write W, V (V in the state dtype)."""
    p = torch.empty((), dtype=dtype).element_size()
    return 4 * p + 2 * torch.empty((), dtype=state_dtype(dtype)).element_size()


def row(passes: list[Pass], numel: int, grouping: str, dtype_name: str) -> dict:
    """One line of the table: DRAM bytes per element (tables included) and launches."""
    tables = sum(p.tables_read + p.tables_written for p in passes)
    read = sum(sum(p.dram_read().values()) + p.tables_read for p in passes)
    written = sum(sum(p.written.values()) + p.tables_written for p in passes)
    total = (read + written) / numel
    sgd = sgd_bytes(DTYPES[dtype_name])
    two_walk = sum(p.two_walk_elements for p in passes)
    return dict(grouping=grouping, dtype=dtype_name, read=read / numel,
                written=written / numel, total=total, tables=tables / numel,
                launches=len(passes), two_walk_share=two_walk / numel,
                sgd=sgd, ratio_to_sgd=total / sgd,
                meets_bytes=total <= TARGET_BYTES[dtype_name],
                meets_launches=len(passes) <= TARGET_LAUNCHES,
                passes=[p.as_dict() for p in passes])


def model_table(name: str, l2_bytes: float) -> dict:
    import torchvision

    rows, numel, tensors = [], 0, 0
    for dtype_name, dtype in DTYPES.items():
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None).to(dtype)
        params = list(model.parameters())
        numel, tensors = sum(p.numel() for p in params), len(params)
        for grouping in GROUPINGS:
            groups = param_groups(model, lam=LAM, grouping=grouping)
            rows.append(row(step_passes(groups, l2_bytes), numel, grouping, dtype_name))
    return dict(model=name, numel=numel, tensors=tensors, l2_bytes=l2_bytes, rows=rows,
                floor={d: rmda_floor(t) for d, t in DTYPES.items()},
                sgd={d: sgd_bytes(t) for d, t in DTYPES.items()},
                targets=dict(bytes=TARGET_BYTES, launches=TARGET_LAUNCHES))


def print_table(result: dict) -> None:
    print(f"{result['model']}: {result['tensors']} tensors, {result['numel']:,} elements; "
          "param groups of rmda_fused.param_groups (conv/linear weights take the grouping, "
          "the rest 'none'); bf16 rows: bf16 params, fp32 state")
    print(f"Triton backend's kernels, modelled from their work plans (not measured): DRAM "
          f"bytes with a {result['l2_bytes'] / 1e6:g} MB L2 (benchmarks/traffic.py states the "
          "model); torch ops that optimizer.step() may run besides them are not included; "
          "2-walk elts: share of the elements in bands walked twice (their V and W0 re-read, "
          "from L2 where the band fits it)")
    print(f"{'grouping':15s} {'dtype':5s} {'read B/elt':>10s} {'written B/elt':>13s} "
          f"{'total':>7s} {'2-walk elts':>11s} {'launches/step':>13s} {'x SGD':>6s}")
    for r in result["rows"]:
        print(f"{r['grouping']:15s} {r['dtype']:5s} {r['read']:10.2f} {r['written']:13.2f} "
              f"{r['total']:7.2f} {100 * r['two_walk_share']:10.0f}% {r['launches']:13d} "
              f"{r['ratio_to_sgd']:5.2f}x")
    tables = [r["tables"] for r in result["rows"]]
    print(f"the totals include {min(tables):.3f}-{max(tables):.3f} B/elt of the launches' own "
          "tables (meta rows, task/tile tables, arrival counters; counted whole: a bound)")
    floor, sgd = result["floor"], result["sgd"]
    print(f"RMDA floor: fp32 {floor['fp32']} B/elt ({floor['fp32'] / sgd['fp32']:.2f}x), bf16 "
          f"{floor['bf16']} B/elt ({floor['bf16'] / sgd['bf16']:.2f}x); torch fused momentum "
          f"SGD: fp32 {sgd['fp32']} B/elt, bf16 {sgd['bf16']} B/elt")

    def meeting(*keys: str) -> str:
        met = [f"{r['grouping']}/{r['dtype']}" for r in result["rows"]
               if all(r[k] for k in keys)]
        return ", ".join(met) or "none"

    print(f"targets: <= {TARGET_BYTES['fp32']} B/elt fp32, <= {TARGET_BYTES['bf16']} B/elt "
          f"bf16 params with fp32 state, <= {TARGET_LAUNCHES} launches/step. Bytes met by: "
          f"{meeting('meets_bytes')}. Launches met by: {meeting('meets_launches')}. Both: "
          f"{meeting('meets_bytes', 'meets_launches')}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="torchvision model: resnet50, vit_b_16, ...")
    parser.add_argument("--json", help="write the table (and every launch's bytes) here")
    parser.add_argument("--l2-mb", type=float, default=L2_MB, help="L2 size of the model")
    parser.add_argument("--check", action="store_true",
                        help="compare the model with counted loads/stores (interpreter)")
    args = parser.parse_args(argv)
    if args.check:
        from ._traffic_count import run_check

        return 0 if run_check(args.l2_mb * 1e6) else 1
    if not args.model:
        parser.error("name a model, or pass --check")
    result = model_table(args.model, args.l2_mb * 1e6)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
