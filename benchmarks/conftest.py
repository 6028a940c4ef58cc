"""pytest-benchmark configuration of the step benchmarks.

``pytest benchmarks/ --benchmark-only`` times them. Plain ``pytest benchmarks/`` (or any run
that collects this folder without --benchmark-only / --benchmark-enable) calls each step once,
untimed: a quick check that every case still runs, never minutes of timing by accident.
"""
from __future__ import annotations

import pytest
import torch

from .baselines import MODEL_CASES, TENSOR_CASES, Workload, model_workload, tensors_workload


def _timing_requested(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False)
                or config.getoption("benchmark_enable", False))


def pytest_report_header(config: pytest.Config) -> str | None:
    if not _timing_requested(config):
        return "benchmarks/: each step runs once, untimed (pass --benchmark-only to time them)"
    return None


@pytest.fixture(scope="session")
def workloads() -> dict[tuple[str, str], Workload]:
    """(case, device) -> Workload, built once per session (resnet50 takes a moment)."""
    return {}


@pytest.fixture
def workload(workloads, case: str, device: str) -> Workload:
    key = (case, device)
    if key not in workloads:
        if case in MODEL_CASES:
            workloads[key] = model_workload(case, device, torch.float32)
        else:
            workloads[key] = tensors_workload(case, TENSOR_CASES[case], device, torch.float32)
    return workloads[key]


@pytest.fixture
def step_benchmark(benchmark, request: pytest.FixtureRequest):
    """pytest-benchmark's fixture, made a single untimed call unless timing was asked for."""
    if not _timing_requested(request.config):
        benchmark.disabled = True
    return benchmark
