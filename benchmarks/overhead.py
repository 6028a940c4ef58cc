"""How much does RMDA's optimizer.step() cost next to torch's SGD? One command, one report.

    python -m benchmarks.overhead --model resnet50 --device cpu --dtype fp32

times, over the model's parameter list with random gradients, every rmda_fused backend that
runs on the device, an "authors-style loop" (RMDA written as the authors' published optimizer
is: separate tensor ops per parameter), ProxSGD (rmda_fused.ProxSGD: torch SGD, momentum
0.9, then a group-LASSO prox with torch ops) and plain torch SGD (foreach, fused). It also sweeps total elements and
number of tensors, and measures the share of a ResNet training iteration spent in step().
JSON, Markdown and PNGs are written to --out (default benchmarks/results/<device>-<dtype>/);
``python -m benchmarks.overhead --render DIR`` redraws them from DIR/results.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from . import plots, tables
from .baselines import (DTYPES, Method, build_model, conv_shape, methods_for, model_workload,
                        reference_label, regularized_flags, tensors_workload)
from .timing import copy_bandwidth, machine_info, summarize, sync, time_calls

SECTIONS = ("step", "scaling", "training")


def _time_method(method: Method, workload, device: str, warmup: int, steps: int) -> dict:
    params = workload.fresh_params()
    step = method.build(params, workload.regularized)
    stats = summarize(time_calls(step, device, warmup, steps))
    stats["bytes"] = method.bytes_per_step(params, workload.regularized)
    del step, params
    gc.collect()  # free this method's state before the next one allocates its own
    return stats


def step_section(args, methods: list[Method], bandwidth: dict) -> dict:
    workload = model_workload(args.model, args.device, DTYPES[args.dtype])
    rows = []
    for m in methods:
        stats = _time_method(m, workload, args.device, args.warmup, args.steps)
        stats["GBps"] = stats["bytes"] / stats["median"] / 1e9
        rows.append(dict(method=m.label, family=m.family, **stats))
        print(f"  {m.label:20s} {stats['median'] * 1e3:9.3f} ms", file=sys.stderr)
    ref = reference_label([r["method"] for r in rows])
    ref_median = next(r["median"] for r in rows if r["method"] == ref)
    for r in rows:
        r["ratio"] = r["median"] / ref_median
    return dict(workload=f"{args.model} parameters", numel=workload.numel,
                tensors=len(workload.weights), steps=args.steps, warmup=args.warmup,
                ratio_to=ref, rows=rows)


def _sweep(args, methods: list[Method], workloads: list, x: list) -> dict:
    series: dict[str, list] = {m.label: [] for m in methods}
    for w in workloads:
        for m in methods:
            series[m.label].append(_time_method(m, w, args.device, args.scaling_warmup,
                                                args.scaling_steps))
        print(f"  {w.name}: done", file=sys.stderr)
    return dict(x=x, series=series, families={m.label: m.family for m in methods},
                numel=[w.numel for w in workloads])


def scaling_section(args, methods: list[Method]) -> dict:
    dtype = DTYPES[args.dtype]
    sizes = [int(s * 1e6) for s in args.sizes] + ([100_000_000] if args.large else [])
    elements = _sweep(args, methods, [
        tensors_workload(f"{n} elements", [conv_shape(n)], args.device, dtype) for n in sizes
    ], sizes)
    elements.update(title="step time vs total elements (one 3x3 conv weight)",
                    xlabel="elements in the parameter list", xfmt="{:.3g}",
                    note="One conv weight (O, 256, 3, 3) of about that many elements.")
    total = int(args.count_total * 1e6)
    counts = _sweep(args, methods, [
        tensors_workload(f"{k} tensors", [conv_shape(total // k, in_channels=64)] * k,
                         args.device, dtype) for k in args.counts
    ], args.counts)
    counts.update(title=f"step time vs number of tensors ({args.count_total:g}M elements in all)",
                  xlabel=f"number of tensors ({args.count_total:g}M elements in all)",
                  xfmt="{}", note="Equal conv weights (O, 64, 3, 3) sharing the total: "
                                  "the per-tensor launch and Python-loop overhead.")
    return {"elements": elements, "tensors": counts}


def training_section(args, methods: list[Method]) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = build_model(args.model).to(args.device, dtype).train()
    params, regularized = list(model.parameters()), regularized_flags(model)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device,
                    dtype=dtype)
    with torch.no_grad():
        classes = model(x).shape[1]
    y = torch.randint(classes, (args.batch,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for m in methods:
        step = m.build(params, regularized)

        def fwd_bwd() -> None:
            for p in params:
                p.grad = None
            loss_fn(model(x).float(), y).backward()

        for _ in range(args.train_warmup):
            fwd_bwd()
            step()
        fb, st = [], []
        for _ in range(args.train_steps):
            # fwd+bwd and step timed separately, each between synchronisations
            fb += time_calls(fwd_bwd, args.device, 0, 1)
            st += time_calls(step, args.device, 0, 1)
        fb_med, st_med = summarize(fb)["median"], summarize(st)["median"]
        rows.append(dict(method=m.label, family=m.family, fwd_bwd_median=fb_med,
                         step_median=st_med, step_share=st_med / (fb_med + st_med)))
        print(f"  {m.label:20s} step share {100 * rows[-1]['step_share']:5.1f}%", file=sys.stderr)
        del step
        gc.collect()
    return dict(setup=f"{args.model}, batch {args.batch}, {args.image_size}x{args.image_size} "
                      f"images, {args.dtype}", steps=args.train_steps, warmup=args.train_warmup,
                rows=rows)


def write_outputs(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "report.md"]
    files[0].write_text(json.dumps(result, indent=1))
    files[1].write_text(tables.markdown(result))
    if "step" in result:
        files.append(out / "step.png")
        plots.step_bars(result, files[-1])
    if "scaling" in result:
        for key in ("elements", "tensors"):
            files.append(out / f"scaling_{key}.png")
            plots.scaling_lines(result, key, files[-1])
    if "training" in result:
        files.append(out / "training.png")
        plots.training_bars(result, files[-1])
    return files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="torchvision model name, or 'tiny'")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--steps", type=int, default=50, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--copy-mib", type=int, default=256,
                    help="size of each buffer of the copy-bandwidth probe (default 256 MiB: "
                         "far beyond any CPU cache)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/<device>-<dtype>")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--scaling", action="store_true",
                    help="only the scaling sweeps (same as --sections scaling)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64],
                    help="total-element sweep, in millions")
    ap.add_argument("--large", action="store_true", help="add 100M elements to the sweep")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000],
                    help="tensor-count sweep")
    ap.add_argument("--count-total", type=float, default=4, help="millions, split over tensors")
    ap.add_argument("--scaling-steps", type=int, default=15)
    ap.add_argument("--scaling-warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, help="training batch (default 8 cpu, 64 cuda)")
    ap.add_argument("--image-size", type=int, help="default 64 on cpu, 224 on cuda")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--train-warmup", type=int, default=2)
    args = ap.parse_args(argv)
    args.sections = ["scaling"] if args.scaling else args.sections.split(",")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    on_gpu = args.device == "cuda"
    args.batch = args.batch or (64 if on_gpu else 8)
    args.image_size = args.image_size or (224 if on_gpu else 64)
    args.out = args.out or Path("benchmarks/results") / f"{args.device}-{args.dtype}"
    if on_gpu and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def render(directory: Path) -> dict:
    """Rewrite the Markdown and PNGs of a saved report from its results.json (no timing)."""
    result = json.loads((directory / "results.json").read_text())
    write_outputs(result, directory)
    print(tables.markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:
        if len(argv) != 2:
            sys.exit("usage: python -m benchmarks.overhead --render DIR")
        return render(Path(argv[1]))
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, skipped = methods_for(args.device, DTYPES[args.dtype])
    command = "python -m benchmarks.overhead " + shlex.join(argv)
    result: dict = dict(
        run=dict(vars(args), out=str(args.out), command=command),
        machine=machine_info(args.device), skipped=skipped,
        copy_bandwidth=copy_bandwidth(args.device, args.copy_mib * 2**20),
    )
    print(f"copy bandwidth {result['copy_bandwidth']['GBps']:.1f} GB/s", file=sys.stderr)
    for name in args.sections:
        print(f"[{name}]", file=sys.stderr)
        if name == "step":
            result["step"] = step_section(args, methods, result["copy_bandwidth"])
        elif name == "scaling":
            result["scaling"] = scaling_section(args, methods)
        else:
            result["training"] = training_section(args, methods)
        sync(args.device)
    for path in write_outputs(result, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(tables.markdown(result))
    return result


if __name__ == "__main__":
    main()
