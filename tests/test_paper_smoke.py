"""``python -m benchmarks.paper.run --quick``: the mechanics, not the scientific outcome.

The full run (3 seeds, 100 epochs, minutes) is what the README quotes; here one seed, a few
epochs and one lam per case check that identification is tracked and every output is written.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# benchmarks/ is not installed: import it from the checkout, however pytest was started
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.paper import experiments, run  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    threads = torch.get_num_threads()
    rows = run.main(["--quick", "--out", str(out), "--workers", "1"])
    assert torch.get_num_threads() == threads  # in-process runs restore the thread count
    return out, rows, json.loads((out / "results.json").read_text())


def test_outputs_written(quick):
    out, _, _ = quick
    for name in ("report.md", "results.json", "logistic_dynamics.png", "cnn_dynamics.png",
                 "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.md").read_text().startswith("# RMDA vs proximal SGD")
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_present_and_tracked(quick):
    _, rows, data = quick
    cases = run.quick_cases()
    runs = data["runs"]
    # both cases, every method, one lam (plain SGD has none), one seed
    assert {(r["case"], r["method"]) for r in runs} == {
        (c, m) for c in cases for m in experiments.METHODS}
    assert len(runs) == len(run.jobs(cases, [0]))
    for r in runs:
        epochs = cases[r["case"]].epochs
        # identification tracked once per epoch, and per step summed per epoch
        assert len(r["flips_epoch"]) == len(r["flips_steps"]) == epochs
        assert len(r["accuracy"]) == len(r["sparsity_z"]) == len(r["sparsity_W"]) == epochs
        assert "last_change_epoch" in r and "last_change_step" in r
        if r["last_change_epoch"] is not None:
            assert 1 <= r["last_change_epoch"] <= epochs
            assert 1 <= r["last_change_step"] <= r["steps"]
        assert 0.0 <= r["final_sparsity_z"] <= 1.0 and 0.0 <= r["final_accuracy"] <= 1.0
    # the restart + 'iclr' schedule ran: RMDA's c went from 0.1 to 1 at the first milestone
    rmda = next(r for r in runs if r["method"] == "RMDA")
    assert rmda["momentum"][0] == pytest.approx(0.1) and rmda["momentum"][-1] == pytest.approx(1.0)
    # plain SGD has no regularizer: nothing ever becomes zero
    assert all(r["final_sparsity_z"] == 0.0 for r in runs if r["method"] == "SGD")
    assert len(rows) == len(data["summary"]) == len(runs)  # one seed: one row per run


def test_logistic_regularization_bites(quick):
    """Not the paper's claim, only that lam reaches the prox: with the quick lam the convex
    case zeroes some pixels for a method that regularizes at full strength."""
    _, _, data = quick
    ema = next(r for r in data["runs"] if r["case"] == "logistic" and r["method"] == "ProxSGD-ema")
    assert ema["final_sparsity_z"] > 0.0
