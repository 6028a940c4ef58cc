"""Host time of RMDA's step() with its kernel launches stubbed out: what Python costs per
step, and how it grows with the number of tensors.

    python -m benchmarks.host_time [--device cpu|cuda] [--copies 1 10]

The parameter list is ResNet-50's shapes scaled down to a few elements each (the sizes do
not matter once launches are stubbed), repeated ``copies`` times: 161 and 1,610 tensors by
default, in two param groups as rmda_fused.param_groups makes them. The backends'
``rmda_step_`` and the gradient check are replaced by no-ops, so the time is the
optimizer's own work: checks, the step plan's validity test, gathering gradients, options.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from rmda_fused import RMDA, functional

# ResNet-50's tensors, by ndim and count (53 conv weights + fc, 107 1-D tensors)
_RESNET50 = [(4, 53), (2, 1), (1, 107)]


def parameter_list(copies: int, device: str) -> list[torch.nn.Parameter]:
    params = []
    for _ in range(copies):
        for ndim, count in _RESNET50:
            for _ in range(count):
                shape = (4, 3, 3, 3)[:ndim] if ndim > 1 else (4,)
                p = torch.nn.Parameter(torch.randn(shape, device=device))
                p.grad = torch.randn_like(p)
                params.append(p)
    return params


@contextmanager
def stubbed_launches():
    saved = {name: module.rmda_step_ for name, module in functional._BACKENDS.items()}
    saved_flag = functional.nonfinite_flag
    try:
        for module in functional._BACKENDS.values():
            module.rmda_step_ = lambda batch, options: None
        functional.nonfinite_flag = lambda grads: None
        yield
    finally:
        for name, module in functional._BACKENDS.items():
            module.rmda_step_ = saved[name]
        functional.nonfinite_flag = saved_flag


def host_time_us(copies: int, device: str, steps: int) -> float:
    params = parameter_list(copies, device)
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() <= 1]
    opt = RMDA([dict(params=weights), dict(params=biases, lam=0.0)], lr=0.1, lam=1e-4)
    times = []
    with stubbed_launches():
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[steps // 5:]) * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    result = {}
    for copies in args.copies:
        n = copies * sum(count for _, count in _RESNET50)
        result[n] = host_time_us(copies, args.device, args.steps)
        print(f"{n:6d} tensors: {result[n]:8.1f} us per step (launches stubbed, "
              f"{args.device}, torch {torch.__version__})")
    counts = sorted(result)
    if len(counts) > 1:
        print(f"growth {counts[0]} -> {counts[-1]} tensors: "
              f"{result[counts[-1]] / result[counts[0]]:.2f}x")
    return result


if __name__ == "__main__":
    main()
