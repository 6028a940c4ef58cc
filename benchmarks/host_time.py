"""Host time of RMDA's step() with its kernel launches stubbed out: what Python costs per
step, and how it grows with the number of tensors.

    python -m benchmarks.host_time [--device cpu|cuda] [--copies 1 10]

The parameter list is ResNet-50's shapes scaled down to a few elements each (the sizes do
not matter once launches are stubbed), repeated ``copies`` times: 161 and 1,610 tensors by
default, in two param groups as rmda_fused.param_groups makes them. The backends'
steps (``rmda_step_`` and, for the planned steps of csrc/step_plan.cpp, ``run_planned``)
and the gradient checks are replaced by no-ops, so the time is the optimizer's own work:
checks, the step plan's validity test (which reads every gradient), options.
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


# what runs kernels: the backends' steps, listed or planned, and the gradient checks
_LAUNCHES = [(module, name) for module in functional._BACKENDS.values()
             for name in ("rmda_step_", "run_planned") if hasattr(module, name)]
_LAUNCHES += [(functional, "nonfinite_flag"), (functional, "planned_nonfinite_flag")]


@contextmanager
def stubbed_launches():
    saved = [(module, name, getattr(module, name)) for module, name in _LAUNCHES]
    flag = torch.zeros(())  # a planned check that ran (None would make the step list grads)
    try:
        for module, name in _LAUNCHES:
            setattr(module, name, lambda *args: None)
        functional.planned_nonfinite_flag = lambda *args: flag
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def _optimizer(copies: int, device: str) -> tuple[RMDA, list[list[torch.Tensor]]]:
    """RMDA over the parameter list in param_groups' two groups, and two sets of gradients
    to hand over in turn (as zero_grad(set_to_none=True) and backward do: new tensors each
    step, with the same layouts)."""
    params = parameter_list(copies, device)
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() <= 1]
    opt = RMDA([dict(params=weights), dict(params=biases, lam=0.0)], lr=0.1, lam=1e-4)
    return opt, [[torch.randn_like(p) for p in weights + biases] for _ in range(2)]


def _round(opt: RMDA, grads: list[list[torch.Tensor]], steps: int) -> float:
    """The median host time of ``steps`` steps, in microseconds."""
    params = [p for group in opt.param_groups for p in group["params"]]
    times = []
    for k in range(steps):
        for p, g in zip(params, grads[k % 2]):
            p.grad = g
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def host_times_us(copies: list[int], device: str, steps: int, rounds: int) -> list[float]:
    """Per entry of ``copies``, the least over ``rounds`` of the median host time of
    ``steps`` steps; the rounds of every size take turns, so that a slow spell of a shared
    machine does not fall on one size only."""
    setups = [_optimizer(c, device) for c in copies]
    best = [float("inf")] * len(copies)
    with stubbed_launches():
        for opt, grads in setups:  # the first steps build the plans
            _round(opt, grads, 2)
        for _ in range(rounds):
            for i, (opt, grads) in enumerate(setups):
                best[i] = min(best[i], _round(opt, grads, steps))
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--steps", type=int, default=200, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    result = {}
    times = host_times_us(args.copies, args.device, args.steps, args.rounds)
    for copies, us in zip(args.copies, times):
        n = copies * sum(count for _, count in _RESNET50)
        result[n] = us
        print(f"{n:6d} tensors: {us:8.1f} us per step (launches stubbed, least median of "
              f"{args.rounds} rounds of {args.steps} steps, {args.device}, "
              f"torch {torch.__version__})")
    counts = sorted(result)
    if len(counts) > 1:
        print(f"growth {counts[0]} -> {counts[-1]} tensors: "
              f"{result[counts[-1]] / result[counts[0]]:.2f}x")
    return result


if __name__ == "__main__":
    main()
