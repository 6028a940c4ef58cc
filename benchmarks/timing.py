"""Timing primitives: per-call wall times with device synchronisation, robust statistics,
the copy bandwidth the step times are compared against, and a description of the machine."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones.

    Each call is timed alone between two synchronisations, so a GPU time includes the host's
    launch overhead, which is exactly the per-step cost a training loop pays.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _quantile(sorted_xs: list[float], q: float) -> float:
    # linear interpolation between order statistics (numpy's default)
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict[str, float]:
    xs = sorted(times)
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p10": _quantile(xs, 0.10),
        "p25": _quantile(xs, 0.25),
        "p75": _quantile(xs, 0.75),
        "p90": _quantile(xs, 0.90),
        "min": xs[0],
        "mean": statistics.fmean(xs),
    }


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> dict[str, float]:
    """Achieved bandwidth of ``dst.copy_(src)`` on ``nbytes`` buffers, counting read + write.

    Buffers far larger than the last-level cache make this the memory bandwidth an
    optimizer step (which streams its tensors once) can hope for on the same machine.
    """
    n = max(1, nbytes // 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, warmup=2, steps=repeats)
    moved = 2 * src.numel() * src.element_size()
    median = statistics.median(times)
    return {"bytes": moved, "median_s": median, "GBps": moved / median / 1e9}


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def machine_info(device: str) -> dict[str, object]:
    lscpu = _lscpu()
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": lscpu.get("Model name", platform.processor() or platform.machine()).strip(),
        # the cache size says which step sizes can be served from cache instead of memory
        "l3_cache": lscpu.get("L3 cache", "?").strip(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # other processes on the machine skew CPU timings (OpenMP threads wait for each
        # other), so the report says how busy the machine was
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info
