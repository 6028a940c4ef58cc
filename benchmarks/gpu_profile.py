"""Where a GPU step's time goes: per method, the kernels one step launches, their summed
device time, and the step's wall time, so host time and device time can be told apart.

    python -m benchmarks.gpu_profile [--model resnet50] [--dtype fp32]

Same workload and methods as ``python -m benchmarks.overhead`` (benchmarks/baselines.py).
Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from rmda_fused.selftest import is_kernel_event

from .baselines import DTYPES, methods_for, model_workload
from .timing import time_calls


def profile_step(step, steps: int) -> dict:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if is_kernel_event(e)]
    names: dict[str, float] = {}
    for e in kernels:
        names[e.name[:60]] = names.get(e.name[:60], 0.0) + e.device_time / steps
    wall = statistics.median(time_calls(step, "cuda", warmup=3, steps=50))
    return dict(launches=len(kernels) / steps, device_us=sum(names.values()),
                wall_us=wall * 1e6, kernels=names)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    workload = model_workload(args.model, "cuda", DTYPES[args.dtype])
    methods, skipped = methods_for("cuda", DTYPES[args.dtype])
    print(f"{args.model} {args.dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'method':40s} {'launches':>8s} {'device us':>10s} {'wall us':>9s}")
    result = {}
    for method in methods:
        if "authors" in method.label or "reference" in method.label:
            continue
        step = method.build(workload.fresh_params(), workload.regularized)
        r = result[method.label] = profile_step(step, args.steps)
        print(f"{method.label:40s} {r['launches']:8.1f} {r['device_us']:10.1f} {r['wall_us']:9.1f}")
        for name, us in sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:4]:
            print(f"    {us:8.1f} us  {name}")
    return result


if __name__ == "__main__":
    main()
