"""DRAM bytes per parameter element and launches per step of the Triton backend, modelled
from the kernels' own work plans, and checked against the loads and stores they make.

    python -m benchmarks.traffic resnet50 [--json PATH] [--l2-mb 50]
    python -m benchmarks.traffic --check

The table is a model, not a measurement. Per param group (as rmda_fused.param_groups builds
them) and dtype bucket, the launches and their grids come from the wrappers' planners
(``rmda_grouped.plan`` with ``rmda_grouped.TILES``, ``rmda_elementwise._tiles`` with its
BLOCK, ``rmda_scalars.BLOCK_T``); which element arrays each kind of program reads and writes
is read off the kernel bodies (``READS``/``WRITES`` below). DRAM model:

- the step starts with none of its tensors in L2; every byte written reaches DRAM once;
  stores cover whole sectors (no read for ownership); bytes, not 32-byte sectors, are counted;
- a pass reads each address it touches once (what --check counts);
- a later pass's re-read of data an earlier pass touched (the apply pass re-reading V and W0
  of a chunked group set) is served by L2 when the bytes touched in between, with programs
  running in id order and L2 kept as LRU, fit the L2 (``--l2-mb``, default 50: H100 SXM and
  H200); otherwise it is read from DRAM again;
- the launches' own tables (meta rows, tile tables, per-tensor scratch, hyper parameters and
  AMP scalars, partial sums) are counted whole, once per launch that uses them: an upper bound.

``--check`` runs optimizer steps on small shapes in Triton's interpreter, counts the bytes the
kernels load and store (benchmarks/_traffic_count.py) and compares them with this model.
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

import triton  # noqa: E402

from rmda_fused import param_groups  # noqa: E402
from rmda_fused.batch import StepBatch, state_dtype  # noqa: E402
from rmda_fused.grouping import effective_grouping, group_view  # noqa: E402
from rmda_fused.kernels import _common, rmda_elementwise, rmda_grouped, rmda_scalars  # noqa: E402

L2_MB = 50  # H100 SXM and H200 (../shared/GPU_NOTES.md)
GROUPINGS = ("input_channel", "output_channel", "elementwise", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_BYTES = {"fp32": 25, "bf16": 17}  # per element, bf16 params with fp32 state
TARGET_LAUNCHES = 2
LAM = 1e-4  # > 0: every regularized tensor takes its prox

ELEMENT_ROLES = ("grad", "param", "initial", "dual")
STATE_ROLES = ("step", "alpha", "zero_mask")
# Which element arrays each kind of program reads and writes, as the kernel bodies in
# kernels/ do: the plans do not say (--check counts it). "chunk" is pass 1 of a group set
# too big for one tile, "apply" its pass 2; the zero mask is counted apart (per group).
READS = {"elementwise": ("grad", "dual", "initial", "param"),
         "one_pass": ("grad", "dual", "initial", "param"),
         "chunk": ("grad", "dual", "initial"),
         "apply": ("dual", "initial", "param")}
WRITES = {"elementwise": ("dual", "param"), "one_pass": ("dual", "param"),
          "chunk": ("dual",), "apply": ("param",)}
HYPER_BYTES = 4 * 8  # _common.Hyper: lr, c, 1 - c, lam in fp64
AMP_SCALAR_BYTES = 3 * 8  # at most: a tensor lr, grad_scale, found_inf


@dataclass
class Pass:
    """One launch: its kernel, its grid, and per role the bytes it reads and writes, each
    address once. ``l2_served``: of ``read``, the re-reads the L2 model serves."""

    kernel: str
    programs: int
    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    l2_served: Counter = field(default_factory=Counter)
    tables_read: int = 0  # upper bounds (module docstring)
    tables_written: int = 0

    def dram_read(self) -> Counter:
        return self.read - self.l2_served

    def as_dict(self) -> dict:
        return dict(kernel=self.kernel, programs=self.programs, read=dict(self.read),
                    written=dict(self.written), l2_served=dict(self.l2_served),
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


def _state_tables(batch: StepBatch) -> tuple[int, int]:
    """Bytes of the meta table and of the scratch rows of a bucket."""
    n = len(batch)
    return n * _common.NCOL.value * 8, n * _common.NSCR.value * _sizes(batch)["dual"]


def scalars_pass(batch: StepBatch) -> Pass:
    n, f = len(batch), _sizes(batch)["dual"]
    meta, scratch = _state_tables(batch)
    scalars = Counter(step=n * f, alpha=n * f)
    return Pass(_name(rmda_scalars._rmda_scalars_kernel),
                triton.cdiv(n, rmda_scalars.BLOCK_T), read=scalars, written=Counter(scalars),
                tables_read=meta + HYPER_BYTES + AMP_SCALAR_BYTES, tables_written=scratch)


def elementwise_passes(batch: StepBatch, prox: bool) -> list[Pass]:
    sizes, block = _sizes(batch), rmda_elementwise.BLOCK
    numels = tuple(p.numel() for p in batch.params)
    tiles = rmda_elementwise._tiles(numels, block)  # (tensor, first element) per program
    covered = int((torch.tensor(numels, dtype=torch.int64)[tiles[:, 0]] - tiles[:, 1])
                  .clamp(max=block).sum()) if len(tiles) else 0
    meta, scratch = _state_tables(batch)
    element = Pass(_name(rmda_elementwise._rmda_elementwise_kernel), len(tiles),
                   read=_element_bytes(covered, READS["elementwise"], sizes),
                   written=_element_bytes(covered, WRITES["elementwise"], sizes),
                   tables_read=meta + tiles.numel() * 8 + scratch + HYPER_BYTES)
    if prox:  # L1: one mask byte per element
        element.written["zero_mask"] = covered
    return [scalars_pass(batch), element]


def _l2_served(chunk_elements: list[float], first_touch: float, second_touch: float,
               reread: float, l2_bytes: float) -> float:
    """Bytes of the apply pass's re-reads that stay in L2 (module docstring): chunk k's data
    was last touched by pass 1; before pass 2 reaches it, pass 1 touches the chunks after k
    and pass 2 the chunks before k. Per element: ``first_touch`` bytes in pass 1,
    ``second_touch`` in pass 2, ``reread`` of them touched by both."""
    later = sum(chunk_elements) * first_touch
    earlier, served = 0.0, 0.0
    for elements in chunk_elements:
        later -= elements * first_touch
        if later + earlier + elements * first_touch <= l2_bytes:
            served += elements * reread
        earlier += elements * second_touch
    return served


def grouped_passes(batch: StepBatch, grouping: str, l2_bytes: float) -> list[Pass]:
    sizes = _sizes(batch)
    block_r, block_l, block_g = rmda_grouped.TILES[grouping]
    dims, one_pass, chunked, slots = rmda_grouped.plan(
        tuple(tuple(v) for v in batch.views), block_r, block_l, block_g)
    col = {name: getattr(rmda_grouped, name).value for name in (
        "TILE_TENSOR", "TILE_FIRST_GROUP", "TILE_ROW_BEGIN", "TILE_ROW_END",
        "TILE_PARTIAL_SLOT", "TILE_FIRST_SLOT")}

    def group_set(tile) -> tuple[int, int]:
        """(groups, elements) of the group set a tile row belongs to."""
        outer, groups, inner, tile_groups = dims[tile[col["TILE_TENSOR"]]]
        n_groups = min(tile_groups, groups - tile[col["TILE_FIRST_GROUP"]])
        return n_groups, outer * n_groups * inner

    one_groups = sum(group_set(t)[0] for t in one_pass)
    one_elements = sum(group_set(t)[1] for t in one_pass)
    # a chunked set is counted at its first chunk; its rows end at the last chunk's end
    firsts = [t for t in chunked if t[col["TILE_PARTIAL_SLOT"]] == t[col["TILE_FIRST_SLOT"]]]
    chunk_groups = sum(group_set(t)[0] for t in firsts)
    set_rows = Counter()
    for t in chunked:
        key = t[col["TILE_FIRST_SLOT"]]
        set_rows[key] = max(set_rows[key], t[col["TILE_ROW_END"]])
    # per chunk, its share of its set's elements by rows (for the L2 model's order only)
    chunk_elements = [group_set(t)[1] * (t[col["TILE_ROW_END"]] - t[col["TILE_ROW_BEGIN"]])
                      / set_rows[t[col["TILE_FIRST_SLOT"]]] for t in chunked]
    chunk_total = sum(group_set(t)[1] for t in firsts)

    meta, scratch = _state_tables(batch)
    partials = slots * block_g * sizes["dual"]
    first = Pass(_name(rmda_grouped._rmda_grouped_kernel), len(one_pass) + len(chunked),
                 read=(_element_bytes(one_elements, READS["one_pass"], sizes)
                       + _element_bytes(chunk_total, READS["chunk"], sizes)),
                 written=(_element_bytes(one_elements, WRITES["one_pass"], sizes)
                          + _element_bytes(chunk_total, WRITES["chunk"], sizes)),
                 tables_read=meta + (len(one_pass) + len(chunked)) * rmda_grouped.TCOL * 8
                 + scratch + HYPER_BYTES,
                 tables_written=partials)
    first.written["zero_mask"] += one_groups
    touched_by_pass_one = set(READS["chunk"]) | set(WRITES["chunk"])
    reread = tuple(role for role in READS["apply"] if role in touched_by_pass_one)
    apply = Pass(_name(rmda_grouped._rmda_grouped_apply_kernel), len(chunked),
                 read=_element_bytes(chunk_total, READS["apply"], sizes),
                 written=_element_bytes(chunk_total, WRITES["apply"], sizes),
                 tables_read=meta + len(chunked) * rmda_grouped.TCOL * 8 + scratch
                 + HYPER_BYTES + partials)
    apply.written["zero_mask"] += chunk_groups
    for role in reread:
        apply.l2_served[role] = _l2_served(
            chunk_elements, sum(sizes[r] for r in touched_by_pass_one),
            sum(sizes[r] for r in READS["apply"]), sizes[role], l2_bytes)
    return [scalars_pass(batch), first, apply]


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
    """The launches of one optimizer step over ``groups``, in order: a pass with no program
    is not launched (both wrappers skip an empty grid)."""
    passes = []
    for grouping, batch in step_batches(groups):
        if grouping in ("none", "elementwise"):
            passes += elementwise_passes(batch, prox=grouping == "elementwise")
        else:
            passes += grouped_passes(batch, grouping, l2_bytes)
    return [p for p in passes if p.programs]


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
    apply = _name(rmda_grouped._rmda_grouped_apply_kernel)
    # W0 is read by the first pass over every element, and again by an apply pass
    second = sum(p.read["initial"] for p in passes if p.kernel == apply)
    first = sum(p.read["initial"] for p in passes if p.kernel != apply)
    return dict(grouping=grouping, dtype=dtype_name, read=read / numel,
                written=written / numel, total=total, tables=tables / numel,
                launches=len(passes), two_pass_share=second / first if first else 0.0,
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
          "model); torch ops that optimizer.step() may run besides them are not included")
    print(f"{'grouping':15s} {'dtype':5s} {'read B/elt':>10s} {'written B/elt':>13s} "
          f"{'total':>7s} {'2-pass elts':>11s} {'launches/step':>13s} {'x SGD':>6s}")
    for r in result["rows"]:
        print(f"{r['grouping']:15s} {r['dtype']:5s} {r['read']:10.2f} {r['written']:13.2f} "
              f"{r['total']:7.2f} {100 * r['two_pass_share']:10.0f}% {r['launches']:13d} "
              f"{r['ratio_to_sgd']:5.2f}x")
    tables = [r["tables"] for r in result["rows"]]
    print(f"the totals include {min(tables):.3f}-{max(tables):.3f} B/elt of the launches' own "
          "tables (meta rows, tile tables, scratch, partial sums; counted whole: a bound)")
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
