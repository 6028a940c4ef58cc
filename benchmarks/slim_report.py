"""Does a slim model run as much faster as its MACs say? One command, one report.

    python -m benchmarks.slim_report --out docs/benchmarks/slim

For each torchvision model (default ResNet-18, ResNet-50, MobileNetV3-Large; random weights,
random BN statistics), it zeroes a random, seeded fraction of the coupled channel groups
(:mod:`rmda_fused.coupling`: every column of every dense layer that reads the channel, the
pattern ``grouping="coupled"`` leaves), slims the model with :func:`rmda_fused.slim.slim`
and times dense and slim forward passes on the CPU, taking turns (batch 8, 224x224, median,
torch threads = cores). For comparison it also zeroes, per dense conv except the first (it
reads the image), half of its input-channel groups chosen independently of every other layer
(what ``grouping="input_channel"`` leaves), and times that slim model with and without
:class:`rmda_fused.slim.SelectInputs` gathers. The latency ratio (slim / dense) is set next
to the MACs ratio. Writes results.json and report.md to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmda_fused.coupling import column_groups, is_dense_consumer, zero_groups_
from rmda_fused.slim import EXACT_RTOL, measure, slim, with_select_inputs

from .tables import _table, machine_line
from .timing import machine_info

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large")
FRACTIONS = (0.3, 0.5, 0.7)
INDEPENDENT_FRACTION = 0.5
TARGET = 0.2  # the latency ratio should be within 20% of the MACs ratio
# wall: what a user waits; cpu: this process's CPU time, which other processes on a shared
# machine disturb least (with --threads 1: with more, it also counts threads waiting)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "latency is wall time", "cpu": "latency is the process's CPU time"}


def build(name: str, generator: torch.Generator) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():  # random BN statistics: removed channels must not leak a BN bias
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


def zero_coupled(model: nn.Module, x: torch.Tensor, fraction: float,
                 generator: torch.Generator) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` with round(fraction * n) of its n coupled groups zero."""
    model = copy.deepcopy(model)
    groups = column_groups(model, x)
    coupled = groups.coupled.nonzero().flatten()
    chosen = coupled[torch.randperm(len(coupled), generator=generator)[:round(fraction * len(coupled))]]
    zero = torch.zeros(groups.num_groups, dtype=torch.bool)
    zero[chosen] = True
    zero_groups_(groups, zero)
    return model, len(chosen), len(coupled)


@torch.no_grad()
def zero_independent(model: nn.Module, fraction: float, generator: torch.Generator
                     ) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` in which every dense conv but the first has round(fraction * I)
    of its I input-channel groups zero, chosen independently per layer."""
    model = copy.deepcopy(model)
    convs = [m for m in model.modules() if is_dense_consumer(m) and not isinstance(m, nn.Linear)]
    zeroed = total = 0
    for conv in convs[1:]:
        columns = conv.weight.shape[1]
        chosen = torch.randperm(columns, generator=generator)[:round(fraction * columns)]
        conv.weight[:, chosen] = 0
        zeroed, total = zeroed + len(chosen), total + columns
    return model, zeroed, total


def _row(setting: str, zeroed: int, groups: int, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    dense = measured["dense"]
    row = dict(setting=setting, zero_groups=zeroed, groups=groups, dense=dense, slim={})
    for name, m in measured.items():
        if name == "dense":
            continue
        macs_ratio, latency_ratio = m["macs"] / dense["macs"], m["latency_ms"] / dense["latency_ms"]
        row["slim"][name] = dict(m, macs_ratio=macs_ratio, params_ratio=m["params"] / dense["params"],
                                 latency_ratio=latency_ratio,
                                 latency_ratio_min=m["latency_ms_min"] / dense["latency_ms_min"],
                                 within_target=abs(latency_ratio / macs_ratio - 1) <= TARGET)
    return row


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(args.seed)
    model = build(name, generator)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
    rows = []
    for fraction in args.fractions:
        zeroed, chosen, groups = zero_coupled(model, x[:1], fraction, generator)
        slimmed = slim(zeroed, x[:1], select_inputs=False)
        measured = measure(zeroed, {"slim": slimmed}, x, args.repeats, CLOCKS[args.clock])
        rows.append(_row(f"coupled {fraction:.0%}", chosen, groups, measured))
        print(f"{name} {rows[-1]['setting']}: {_summary(rows[-1])}", flush=True)
    zeroed, chosen, groups = zero_independent(model, INDEPENDENT_FRACTION, generator)
    plain = slim(zeroed, x[:1], select_inputs=False)
    measured = measure(zeroed, {"slim": plain, "slim_select_inputs": with_select_inputs(plain)},
                       x, args.repeats, CLOCKS[args.clock])
    rows.append(_row(f"input_channel {INDEPENDENT_FRACTION:.0%} per layer", chosen, groups, measured))
    print(f"{name} {rows[-1]['setting']}: {_summary(rows[-1])}", flush=True)
    return [dict(row, model=name) for row in rows]


def _summary(row: dict[str, Any]) -> str:
    return "; ".join(f"{name}: MACs x{s['macs_ratio']:.2f}, latency x{s['latency_ratio']:.2f} "
                     f"({row['dense']['latency_ms']:.0f} -> {s['latency_ms']:.0f} ms)"
                     for name, s in row["slim"].items())


def _load_at_end(result: dict[str, Any]) -> str:
    load = result["machine"].get("load_average_1min_at_end")
    return "" if load is None else f", {load:.2f} at the end"


def markdown(result: dict[str, Any]) -> str:
    run = result["run"]
    header = ["model", "zeroed", "slim model", "params (M)", "MACs/image (G)", "latency ms",
              "MACs ratio", "latency ratio", "latency / MACs", f"within {TARGET:.0%}",
              "fastest-pass ratio",
              "removed channels", "kept", "SelectInputs cols", "max rel. diff"]
    rows, within = [], 0
    for row in result["rows"]:
        d = row["dense"]
        within += sum(s["within_target"] for s in row["slim"].values())
        for name, s in row["slim"].items():
            rows.append([
                row["model"], f"{row['setting']} ({row['zero_groups']:,} of {row['groups']:,})", name,
                f"{d['params'] / 1e6:.2f} -> {s['params'] / 1e6:.2f}",
                f"{d['macs'] / 1e9:.3f} -> {s['macs'] / 1e9:.3f}",
                f"{d['latency_ms']:.0f} -> {s['latency_ms']:.0f}",
                f"{s['macs_ratio']:.3f}", f"{s['latency_ratio']:.3f}",
                f"{s['latency_ratio'] / s['macs_ratio']:.2f}", "yes" if s["within_target"] else "no",
                f"{s['latency_ratio_min']:.3f}",
                f"{s['removed_channels']:,}", f"{s['kept_channels']}", f"{s['selected_inputs']:,}",
                f"{s['max_abs_diff'] / s['max_abs_output']:.1e}"])
    lines = [
        "# Slim models: latency against MACs", "",
        f"`{run['command']}`", "",
        f"Machine: {machine_line(result)}{_load_at_end(result)}."
        + (f" {run['note']}" if run["note"] else ""), "",
        f"CPU forward passes, batch {run['batch']}, {run['image_size']}x{run['image_size']}, "
        f"fp32, eval mode, {run['threads']} torch thread(s); {CLOCK_TEXT[run['clock']]}: median "
        f"of {run['repeats']} passes after 3 warm-up passes, dense and "
        "slim models taking turns so that load changes hit both. Random weights and BN "
        f"statistics (seed {run['seed']}). *coupled p%*: p% of the model's coupled channel "
        "groups (every column that reads one channel, over all dense layers: "
        "`param_groups(grouping=\"coupled\")`) zero, chosen at random; the slim model has "
        f"no SelectInputs. *input_channel {INDEPENDENT_FRACTION:.0%} per layer*: in every "
        "dense conv but the first, half of its input-channel groups zero, chosen "
        "independently per layer; `slim` removes a channel only where all of its readers "
        "zeroed it, and the rest either stay (`slim`) or are gathered away by SelectInputs "
        "(`slim_select_inputs`). Ratios are slim / dense; *latency / MACs* is the latency "
        f"ratio over the MACs ratio (target: within {TARGET:.0%} of 1); *fastest-pass ratio*: "
        "the same ratio from each model's fastest pass, less affected by other load. "
        "*max rel. diff*: "
        f"max |output difference| / max |dense output| (exact means <= {EXACT_RTOL:g}).", "",
        *_table(header, rows), "",
        f"{within} of {len(rows)} slim models have a latency ratio within {TARGET:.0%} of "
        "their MACs ratio.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and report.md")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated torchvision model names (default: %(default)s)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="fractions of coupled groups zeroed (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7, help="timed passes per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads (default: the cores, %(default)s)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (use with --threads 1)")
    p.add_argument("--note", default="", help="a sentence for the report, e.g. about the machine")
    args = p.parse_args(argv)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.slim_report " + shlex.join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = dict(
        machine=machine_info("cpu"),
        run=dict(command=command,
                 device="cpu", batch=args.batch, image_size=args.image_size,
                 repeats=args.repeats, seed=args.seed, note=args.note, target=TARGET,
                 threads=args.threads, clock=args.clock),
        rows=[])
    for name in args.models.split(","):
        result["rows"] += run_model(name, args)
    if hasattr(os, "getloadavg"):  # how busy the machine was at the end, too
        result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    return result


if __name__ == "__main__":
    main()
