"""``python -m rmda_fused.demo`` (the ``--preset digits`` run of ``python -m rmda_fused.train``):
the mechanics on a short run, and the promise on the full one."""
import pytest
import torch

import rmda_fused

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from rmda_fused.demo import main  # noqa: E402

SHORT = ["--epochs", "8", "--milestones", "5", "--lam", "6e-3"]  # about a second


def test_short_run_reports_metrics(capsys):
    threads = torch.get_num_threads()
    final = main(SHORT)
    assert set(final) >= {"accuracy", "sparsity_z", "sparsity_W", "last_change"}
    assert isinstance(final["accuracy"], float) and 0.0 <= final["accuracy"] <= 1.0
    assert final["accuracy"] > 0.5  # chance is 0.1: it does learn
    assert 0.0 < final["sparsity_z"] < 1.0  # this lam zeroes some groups, not all
    # apply_prox_point() sets W to z: W's zero groups are exactly z's
    assert final["sparsity_W"] == final["sparsity_z"]
    assert isinstance(final["last_change"], int) and 1 <= final["last_change"] <= 8
    assert torch.get_num_threads() == threads  # --threads is undone on return

    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 8
    assert all("sparsity z" in line and "last change" in line for line in epoch_lines)
    assert "after apply_prox_point()" in out
    # the first line names the backend the step runs on, then the effective config
    first = out.splitlines()[0]
    assert first.startswith("RMDA backend: "), first
    assert first.split()[2].rstrip(",") in rmda_fused.available_backends()
    assert "config:" in out and any(line.split() == ["preset", "=", "digits"] for line in out.splitlines())


def test_quiet_run_is_reproducible(capsys):
    first, second = main(SHORT + ["--quiet"]), main(SHORT + ["--quiet"])
    assert capsys.readouterr().out == ""
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_full_default_run_keeps_the_promise():
    """The demo's defaults (about 10-20 s on two CPU cores): >= 95% test accuracy with an
    exactly structured, group-sparse model."""
    final = main(["--quiet"])
    assert final["accuracy"] >= 0.95
    assert final["sparsity_W"] == final["sparsity_z"] > 0.2
