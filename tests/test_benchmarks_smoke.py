"""A seconds-long run of ``python -m benchmarks.overhead`` so the report cannot rot.

It checks that the command runs end to end and writes its JSON, Markdown and PNGs with a row
for every RMDA backend that runs here (whatever rmda_fused.available_backends() reports) and
for every baseline. Timings are not asserted: CI machines are too noisy for that.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmda_fused import available_backends
from rmda_fused.functional import resolve_backend

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["authors-style loop", "ProxSGD foreach", "ProxSGD fused", "SGD foreach", "SGD fused"]
PNGS = ["step.png", "scaling_elements.png", "scaling_tensors.png", "training.png"]


def _cpu_backends() -> list[str]:
    names = []
    for name, reason in available_backends().items():
        if reason is None:
            try:
                resolve_backend(name, torch.device("cpu"))
            except RuntimeError:
                continue
            names.append(name)
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--model", "tiny", "--device", "cpu",
           "--dtype", "fp32", "--threads", "1", "--copy-mib", "8", "--warmup", "2", "--steps", "3",
           "--sizes", "0.005", "0.02", "--counts", "1", "4", "--count-total", "0.01",
           "--scaling-warmup", "1", "--scaling-steps", "2", "--train-warmup", "1",
           "--train-steps", "2", "--batch", "2", "--image-size", "16", "--out", str(out)]
    # run as the README tells users to: from the checkout root, as a module
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_writes_every_artifact(report: Path) -> None:
    for name in ["results.json", "report.md", *PNGS]:
        path = report / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PNGS:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_every_backend_and_baseline_has_a_row(report: Path) -> None:
    expected = [f"RMDA {name}" for name in _cpu_backends()] + BASELINES
    assert "RMDA reference" in expected
    result = json.loads((report / "results.json").read_text())
    step_rows = {r["method"]: r for r in result["step"]["rows"]}
    training_rows = {r["method"] for r in result["training"]["rows"]}
    markdown = (report / "report.md").read_text()
    for label in expected:
        assert label in step_rows, label
        assert label in training_rows, label
        for key in ("elements", "tensors"):
            assert len(result["scaling"][key]["series"][label]) == 2, (key, label)
        assert f"| {label} |" in markdown, label
    for row in step_rows.values():
        assert row["median"] > 0 and row["bytes"] > 0 and row["p10"] <= row["p90"]
    assert result["step"]["ratio_to"] in step_rows


def test_unavailable_backends_are_reported(report: Path) -> None:
    result = json.loads((report / "results.json").read_text())
    runnable = set(_cpu_backends())
    for name in available_backends():
        if name not in runnable:
            assert f"RMDA {name}" in result["skipped"]
