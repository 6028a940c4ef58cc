"""Reproduce the paper's two claims side by side on scikit-learn's digits, on CPU.

    python -m benchmarks.paper.run [--quick] [--out DIR] [--seeds 0 1 2] [--workers N]
    python -m benchmarks.paper.run --report-only [--out DIR]   # redo report.md + PNGs

Cases: multinomial logistic regression (convex) and a small CNN (non-convex), both with
input-channel group LASSO. Methods: RMDA (authors' restart + 'iclr' momentum schedule),
ProxSGD (heavy-ball), ProxSGD-ema (dampened momentum, same objective as RMDA at equal lam)
and plain momentum SGD; see experiments.METHODS. Writes report.md, results.json and PNGs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch

from . import experiments, plots, report
from .experiments import Case

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# lr per method: the best test accuracy without a regularizer, 100 epochs, seed 0, from
# {0.01, 0.03, 0.1} (SGD) and {0.03, 0.1, 0.3} (RMDA); ProxSGD-ema takes 10x SGD's lr
# because its dampened momentum makes steps 10x shorter. lam grids span low to high
# sparsity without collapsing the model (the CNN's first conv has a single input channel:
# lam >= 1e-2 zeroes it and the CNN falls to chance).
LR = {"RMDA": 0.3, "ProxSGD": 0.03, "ProxSGD-ema": 0.3, "SGD": 0.03}
CASES = {
    "logistic": Case("logistic", epochs=100, milestones=(50, 75), lams=(1e-3, 3e-3, 1e-2, 3e-2), lr=LR),
    "cnn": Case("cnn", epochs=100, milestones=(50, 75), lams=(5e-4, 1e-3, 2e-3, 4e-3), lr=LR),
}


def quick_cases() -> dict[str, Case]:
    """Mechanics only: a few epochs, one lam, still passing both milestones (restarts)."""
    return {name: Case(name, epochs=4, milestones=(2, 3), lams=(c.lams[2],), lr=c.lr)
            for name, c in CASES.items()}


def jobs(cases: dict[str, Case], seeds: list[int]) -> list[tuple[Case, str, float, int]]:
    out = []
    # the CNN runs first: the slowest jobs go first so the two workers finish together
    for case in sorted(cases.values(), key=lambda c: c.name != "cnn"):
        for seed in seeds:
            for method in experiments.METHODS:
                for lam in (case.lams if method != "SGD" else (0.0,)):
                    out.append((case, method, lam, seed))
    return out


def _one(job: tuple[Case, str, float, int]) -> dict:
    return experiments.train(*job).to_dict()


def _init_worker() -> None:
    torch.set_num_threads(1)  # the models are tiny: one thread per run, one run per core


def run_all(todo: list[tuple[Case, str, float, int]], workers: int) -> list[dict]:
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [_one(job) for job in todo]
        finally:
            torch.set_num_threads(threads)
    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        return pool.map(_one, todo, chunksize=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper.run", description=__doc__.split("\n")[1])
    p.add_argument("--quick", action="store_true", help="1 seed, 4 epochs, 1 lam: mechanics only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rewrite report.md and the PNGs from OUT/results.json")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel runs, one torch thread each (1: in this process)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.report_only:
        runs, cases, meta = report.load(args.out / "results.json")
        return _write(args.out, runs, cases, meta)
    cases = quick_cases() if args.quick else CASES
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    todo = jobs(cases, seeds)
    print(f"{len(todo)} runs on {args.workers} worker(s) -> {args.out}", flush=True)
    start = time.perf_counter()
    runs = run_all(todo, args.workers)
    meta = dict(quick=args.quick, seeds=seeds, workers=args.workers,
                wall_seconds=time.perf_counter() - start, torch=torch.__version__)
    rows = _write(args.out, runs, cases, meta)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return rows


def _write(out: Path, runs: list[dict], cases: dict[str, Case], meta: dict) -> list[dict]:
    rows = report.write(out, runs, cases, meta)
    plots.write(out, runs, cases)
    print((out / "report.md").read_text())
    return rows


if __name__ == "__main__":
    main()
