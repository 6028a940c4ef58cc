"""``python -m rmda_fused.selftest``: the quick run CI makes, and proof that its correctness
check fails on a wrong step.

Triton is left out of the CI run: its interpreter takes about 25 s for the ten cases on a
2-core CPU (test_optimizer.py and tests/kernels check it against float64 there instead).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from rmda_fused import _selftest_correctness as correctness
from rmda_fused import selftest
from rmda_fused.backends import reference

CI_BACKENDS = ("reference", "cpu")


def test_quick_selftest_passes(tmp_path):
    report_path = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "rmda_fused.selftest", "--quick", "--report", str(report_path),
         "--backends", ",".join(CI_BACKENDS)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== verdict" in run.stdout
    report = json.loads(report_path.read_text())
    checked = [b for b in CI_BACKENDS if report["backends"][b] is None]
    assert "reference" in checked
    for backend in checked:
        cases = {r["case"]: r["passed"] for r in report["correctness"] if r["backend"] == backend}
        assert cases == dict.fromkeys(correctness.CASES, True), backend
    assert report["correctness_passed"] is True
    if "cpu" in checked:  # the one fused backend a CPU has: it is timed
        (perf,) = report["performance"]
        assert {"RMDA cpu", "SGD fused", "SGD foreach", "ProxSGD fused"} <= set(perf["methods"])
        for entry in perf["methods"].values():
            assert entry["ratio_to_fused_sgd"] > 0 and entry["median_s"] > 0
        assert perf["copy_bandwidth_GBps"] > 0
        assert [t["method"] for t in perf["targets"]] == ["RMDA cpu"]


def _threshold_doubled(step):
    return lambda batch, options: step(batch, dataclasses.replace(options, lam=2 * options.lam))


def _found_inf_ignored(step):
    return lambda batch, options: step(batch, dataclasses.replace(options, found_inf=None))


def _mask_not_written(step):
    def broken(batch, options):
        step(batch, options)
        for mask in batch.zero_masks:
            if mask is not None:
                mask.zero_()
    return broken


def _scales_ignored(apply):
    return lambda batch, options, scales: apply(batch, options, [s.fill_(1.0) for s in scales])


UNREGULARIZED = {"none fp32", "none bf16"}
# the coupled cases' tensors share groups: they step through rmda_partials_/rmda_apply_
COUPLED = {"coupled fp32", "coupled bf16"}


@pytest.mark.parametrize("mutant, patched, failing", [
    (_threshold_doubled, "rmda_step_", set(correctness.CASES) - UNREGULARIZED - COUPLED),
    (_found_inf_ignored, "rmda_step_", {"found_inf"}),
    # every case with a regularizer has zero groups (counted in the report)
    (_mask_not_written, "rmda_step_", set(correctness.CASES) - UNREGULARIZED - COUPLED),
    (_scales_ignored, "rmda_apply_", COUPLED | {"restart"}),
], ids=lambda x: getattr(x, "__name__", None) if callable(x) else None)
def test_correctness_check_fails_on_a_broken_step(monkeypatch, mutant, patched, failing):
    monkeypatch.setattr(reference, patched, mutant(getattr(reference, patched)))
    results = list(correctness.check_backend("reference", "cpu"))
    assert {r["case"] for r in results if not r["passed"]} == failing
    assert all(r["differences"] for r in results if not r["passed"])


def test_builtin_resnet50_shapes_are_torchvisions():
    pytest.importorskip("torchvision")
    name, shapes = selftest.resnet50_shapes()
    assert name == "ResNet-50 (torchvision)"
    assert shapes == selftest.builtin_resnet50_shapes()


def test_gpu_targets():
    """The GPU verdict (not reachable on a CPU machine): ratio, ProxSGD, launches."""
    perf = dict(device="cuda", methods={
        "RMDA triton": dict(median_s=1.2, ratio_to_fused_sgd=1.2, kernel_launches=2),
        "RMDA cuda": dict(median_s=3.0, ratio_to_fused_sgd=3.0, kernel_launches=5),
        "ProxSGD fused": dict(median_s=2.0, ratio_to_fused_sgd=2.0, kernel_launches=300),
        "SGD fused": dict(median_s=1.0, ratio_to_fused_sgd=1.0, kernel_launches=1),
    })
    verdicts = [(t["method"], t["passed"]) for t in selftest.targets(perf)]
    assert verdicts == [("RMDA triton", True)] * 3 + [("RMDA cuda", False)] * 3


def test_unknown_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        selftest.parse_args(["--backends", "reference,nope"])
    assert "unknown backends ['nope']" in capsys.readouterr().err
