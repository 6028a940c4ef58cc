"""PNG charts of a report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: a headless CI machine has no display
import matplotlib.pyplot as plt  # noqa: E402

FAMILY_COLOURS = {"authors": "tab:orange", "proxsgd": "tab:blue", "sgd": "tab:gray"}
# one colour per RMDA backend, in the order rmda_fused lists them (backends come and go)
RMDA_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def colours(families: dict[str, str]) -> dict[str, str]:
    """label -> colour: a colour per RMDA backend, one per baseline family."""
    rmda = [label for label, fam in families.items() if fam == "rmda"]
    return {label: RMDA_COLOURS[rmda.index(label) % len(RMDA_COLOURS)] if fam == "rmda"
            else FAMILY_COLOURS.get(fam, "tab:green") for label, fam in families.items()}


def _title(result: dict, what: str) -> str:
    run = result["run"]
    return f"{what} - {run['device']} {run['dtype']} ({result['machine']['cpu'] if run['device'] == 'cpu' else result['machine'].get('gpu', '')})"


def step_bars(result: dict, path: Path) -> None:
    """Median step time per method with p25-p75 (thick) and p10-p90 (thin) whiskers."""
    rows = result["step"]["rows"]
    labels = [r["method"] for r in rows]
    med = [r["median"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    y = range(len(rows))
    colour = colours({r["method"]: r["family"] for r in rows})
    ax.barh(y, med, color=[colour[label] for label in labels])
    for key_lo, key_hi, width in (("p10", "p90", 1), ("p25", "p75", 3)):
        lo = [m - r[key_lo] * 1e3 for m, r in zip(med, rows)]
        hi = [r[key_hi] * 1e3 - m for m, r in zip(med, rows)]
        ax.errorbar(med, y, xerr=[lo, hi], fmt="none", ecolor="black", elinewidth=width)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer.step() time, ms (median; whiskers p25-p75, p10-p90)")
    ax.set_title(_title(result, f"step over {result['step']['workload']}"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_lines(result: dict, key: str, path: Path) -> None:
    """Median step time against the sweep's x (total elements or number of tensors)."""
    sweep = result["scaling"][key]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colour = colours(sweep["families"])
    for label, series in sweep["series"].items():
        ax.plot(sweep["x"], [s["median"] * 1e3 for s in series], marker="o", label=label,
                color=colour[label],
                linestyle="--" if "foreach" in label or "loop" in label else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(sweep["xlabel"])
    ax.set_ylabel("optimizer.step() median, ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(result, sweep["title"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_bars(result: dict, path: Path) -> None:
    """Stacked forward+backward and optimizer.step medians of one training iteration."""
    rows = result["training"]["rows"]
    labels = [r["method"] for r in rows]
    fb = [r["fwd_bwd_median"] * 1e3 for r in rows]
    st = [r["step_median"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(labels, fb, color="lightgray", label="forward + backward")
    ax.barh(labels, st, left=fb, color="tab:red", label="optimizer.step()")
    for i, r in enumerate(rows):
        ax.text(fb[i] + st[i], i, f" {100 * r['step_share']:.1f}%", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training iteration (medians)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_title(result, f"training step share, {result['training']['setup']}"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
