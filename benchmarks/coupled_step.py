"""Step time with coupled groups next to input_channel groups, on a model's parameter list.

    python -m benchmarks.coupled_step [--model resnet50] [--device cpu] [--steps 20]

Both optimizers take ``rmda_fused.param_groups`` of the same torchvision model (coupled
groups traced on a 64x64 batch) and the same random gradients; torch's fused SGD with
momentum on the same parameters is the baseline measured in the same run. Calls are
interleaved (coupled, input_channel, SGD, ...) so that a busy machine slows all three alike.
Target (issue: structure that pays): coupled <= 1.1x input_channel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rmda_fused import RMDA, param_groups

from .timing import machine_info, sync


def _model(name: str) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coupled_step",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", type=Path, help="write results.json here")
    args = p.parse_args(argv)
    model = _model(args.model).to(args.device)
    example = torch.randn(1, 3, 64, 64, device=args.device)
    coupled = param_groups(model, 1e-4, "coupled", example_inputs=example)
    plain = param_groups(model, 1e-4, "input_channel")
    params = [q for g in plain for q in g["params"]]
    twins = {id(q): torch.nn.Parameter(q.detach().clone()) for q in params}
    triplets = {id(q): torch.nn.Parameter(q.detach().clone()) for q in params}
    coupled = [dict(g, params=[twins[id(q)] for q in g["params"]]) for g in coupled]
    plain = [dict(g, params=[triplets[id(q)] for q in g["params"]]) for g in plain]
    for q in params:
        g = torch.randn_like(q)
        for x in (q, twins[id(q)], triplets[id(q)]):
            x.grad = g.clone()
    methods = {
        "RMDA coupled": RMDA(coupled, lr=0.1, backend=args.backend).step,
        "RMDA input_channel": RMDA(plain, lr=0.1, backend=args.backend).step,
        "torch SGD fused": torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True).step,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for k in range(args.warmup + args.steps):
        for name, step in methods.items():
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = dict(model=args.model, device=args.device, steps=args.steps,
                  tensors=len(params), numel=sum(q.numel() for q in params),
                  median_ms={k: v * 1e3 for k, v in medians.items()},
                  coupled_vs_input_channel=medians["RMDA coupled"] / medians["RMDA input_channel"],
                  machine=machine_info(args.device))
    for name, median in medians.items():
        print(f"{name:20s} {median * 1e3:9.2f} ms  x{median / medians['torch SGD fused']:.2f} fused SGD")
    print(f"coupled / input_channel: {result['coupled_vs_input_channel']:.2f}x "
          f"({result['tensors']} tensors, {args.device}, torch {torch.__version__})", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
