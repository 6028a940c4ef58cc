"""PNG figures: per case, z's group sparsity and pattern flips per epoch (one row per lam),
and one accuracy-vs-sparsity figure with every run as a point."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .experiments import METHODS, Case  # noqa: E402

COLORS = {"RMDA": "tab:red", "ProxSGD": "tab:blue", "ProxSGD-ema": "tab:green", "SGD": "black"}


def _mean_curves(runs: list[dict[str, Any]], key: str) -> dict[tuple[str, float], list[float]]:
    """(method, lam) -> the per-epoch mean over seeds of run[key]."""
    groups: dict[tuple[str, float], list[list[float]]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["lam"])].append(r[key])
    return {k: [sum(v) / len(v) for v in zip(*curves)] for k, curves in groups.items()}


def dynamics(runs: list[dict[str, Any]], case: Case, path: Path) -> None:
    runs = [r for r in runs if r["case"] == case.name and r["method"] != "SGD"]
    lams = sorted({r["lam"] for r in runs})
    sparsity = _mean_curves(runs, "sparsity_z")
    flips = _mean_curves(runs, "flips_steps")
    fig, axes = plt.subplots(len(lams), 2, figsize=(11, 2.6 * len(lams)), squeeze=False,
                             sharex=True)
    epochs = range(1, case.epochs + 1)
    for row, lam in zip(axes, lams):
        for method in METHODS[:-1]:
            if (method, lam) not in sparsity:
                continue
            style = dict(color=COLORS[method], label=method, lw=1.4)
            row[0].plot(epochs, [100 * s for s in sparsity[(method, lam)]], **style)
            row[1].plot(epochs, flips[(method, lam)], **style)
        row[0].set_ylabel(f"lam = {lam:g}\ngroup sparsity of z (%)")
        row[1].set_ylabel("flips per epoch")
        row[1].set_yscale("symlog", linthresh=1)  # 0 must show, and flickering spans decades
        for ax in row:
            for m in case.milestones:
                ax.axvline(m, color="grey", ls=":", lw=0.8)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[0, 0].set_title("sparsity of z (mean over seeds)")
    axes[0, 1].set_title("z groups flipping zero <-> non-zero (sum over steps)")
    for ax in axes[-1]:
        ax.set_xlabel("epoch (dotted: lr milestones, RMDA restarts)")
    fig.suptitle(f"{case.name}: identification of the input-channel structure")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff(runs: list[dict[str, Any]], cases: dict[str, Case], path: Path) -> None:
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, name in zip(axes[0], cases):
        mine = [r for r in runs if r["case"] == name]
        for method in METHODS:
            pts = [r for r in mine if r["method"] == method]
            if method == "SGD" and pts:
                acc = sum(r["final_accuracy"] for r in pts) / len(pts)
                ax.axhline(100 * acc, color=COLORS[method], ls="--", lw=1, label="SGD (no reg.), mean")
                continue
            ax.scatter([100 * r["final_sparsity_z"] for r in pts],
                       [100 * r["final_accuracy"] for r in pts],
                       s=18, alpha=0.75, color=COLORS[method], label=method)
        ax.set_xlabel("group sparsity of z (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: one point per (lam, seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, runs: list[dict[str, Any]], cases: dict[str, Case]) -> list[Path]:
    paths = []
    for case in cases.values():
        paths.append(out / f"{case.name}_dynamics.png")
        dynamics(runs, case, paths[-1])
    paths.append(out / "tradeoff.png")
    tradeoff(runs, cases, paths[-1])
    return paths
