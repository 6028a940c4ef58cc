"""optimizer.step() per method and case: ``pytest benchmarks/ --benchmark-only``.

Methods are every rmda_fused backend (found through available_backends(), so new backends
join automatically; those that cannot run here are reported as skipped with the reason) and
the baselines of benchmarks.baselines: the authors-style loop, ProxSGD and torch SGD
(foreach, fused). Benchmarks are grouped by device and case so that each table compares all
methods on the same tensors.
"""
from __future__ import annotations

import functools

import pytest
import torch

from .baselines import CASES, all_methods, devices, methods_for
from .timing import sync

METHODS = {m.label: m for m in all_methods()}


@functools.lru_cache(maxsize=None)
def _skipped(device: str) -> dict[str, str]:
    return methods_for(device, torch.float32)[1]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("label", list(METHODS))
def test_step(step_benchmark, workload, label: str, case: str, device: str) -> None:
    reason = _skipped(device).get(label)
    if reason:
        pytest.skip(f"{label} on {device}: {reason}")
    method = METHODS[label]
    params = workload.fresh_params()
    step = method.build(params, workload.regularized)

    def timed() -> None:
        step()
        sync(device)  # a GPU step counts until its kernels finish

    step_benchmark.group = f"{device} {case}"
    step_benchmark.extra_info.update(
        numel=workload.numel, tensors=len(params),
        bytes_per_step=method.bytes_per_step(params, workload.regularized))
    step_benchmark(timed)
    assert all(torch.isfinite(p).all() for p in params)
