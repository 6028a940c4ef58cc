"""What a run tells its user: the config, one line and one JSON record per epoch, plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

LOG = "log.jsonl"


def printer(quiet: bool, is_main: bool) -> Callable[..., None]:
    """print on rank 0 unless --quiet, through tqdm so an active progress bar stays intact."""
    if quiet or not is_main:
        return lambda *a, **k: None
    from tqdm import tqdm

    return lambda text="": tqdm.write(str(text))


def config_text(args: Any, extra: dict[str, Any]) -> str:
    items = {**vars(args), **extra}
    width = max(map(len, items))
    return "config:\n" + "\n".join(f"  {k:<{width}} = {v}" for k, v in sorted(items.items()))


def epoch_line(r: dict[str, Any]) -> str:
    return (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  test acc {r['val_top1']:.4f}  "
            f"top-5 {r['val_top5']:.4f}  sparsity z {r['sparsity_z']:6.1%} W {r['sparsity_W']:6.1%}  "
            f"c {r['momentum']:.2g}  flips {r['flips']:3d}  last change {r['last_change']}  "
            f"{r['images_per_s']:,.0f} img/s  step {r['optimizer_share']:.0%} in optimizer")


class JsonLog:
    """``DIR/log.jsonl``: one JSON object per finished epoch. A resumed run drops the records
    of epochs after its checkpoint (an epoch logged but not checkpointed is retrained)."""

    def __init__(self, output: str | Path, resume_epoch: int) -> None:
        self.path = Path(output) / LOG
        kept = [r for r in self.records() if r.get("epoch", 0) <= resume_epoch] if resume_epoch else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot(records: list[dict[str, Any]], output: str | Path) -> list[Path]:
    """accuracy.png and sparsity.png over epochs; [] if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, Agg by default
    except ImportError:
        return []
    epochs = [r["epoch"] for r in records]
    written = []
    for name, ylabel, series in (
        ("accuracy", "validation accuracy", [("top-1", "val_top1"), ("top-5", "val_top5")]),
        ("sparsity", "fraction of groups exactly zero", [("z (prox point)", "sparsity_z"), ("W", "sparsity_W")]),
    ):
        fig = Figure(figsize=(6, 4), layout="tight")
        ax = fig.add_subplot()
        for label, key in series:
            ax.plot(epochs, [r[key] for r in records], label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        path = Path(output) / f"{name}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written
