"""benchmarks/traffic.py: its model of the Triton backend's memory traffic and launches
against the loads, stores and launches counted in Triton's interpreter
(benchmarks/_traffic_count.py), and its table."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

# Before anything imports triton (tests/conftest.py does the same at collection, first):
# counting runs the kernels in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from benchmarks import _traffic_count as count  # noqa: E402
from benchmarks import traffic  # noqa: E402


@pytest.fixture(scope="module")
def interpreter() -> None:
    try:
        count.require_interpreter()
    except RuntimeError as exc:  # a GPU machine compiles the kernels: nothing to count
        pytest.skip(str(exc))


@pytest.mark.parametrize(
    "grouping,dtype,tile", count.check_cases(),
    ids=lambda v: str(v).removeprefix("torch.") if v is not None else "default_tile")
def test_model_matches_counted_bytes_and_launches(interpreter, grouping, dtype, tile):
    # per launch: kernel, grid and every element/state array's bytes exactly; tables
    # within the model's bound; per step, each address once = the DRAM model with an L2
    # that holds these small shapes
    result = count.check_case(grouping, dtype, traffic.L2_MB * 1e6, tile)
    assert not result.mismatches, "\n".join(result.mismatches)
    assert result.launches[0] == result.launches[1]
    assert result.element_bytes[0] == result.element_bytes[1]
    assert result.tables[0] <= result.tables[1]


def test_check_command_reports_agreement(interpreter, monkeypatch, capsys):
    monkeypatch.setattr(count, "check_cases", lambda: [("none", torch.float32, None)])
    assert traffic.main(["--check"]) == 0
    assert "model and count agree" in capsys.readouterr().out


def _linear_groups(out_features: int, in_features: int, grouping: str) -> list[dict]:
    with torch.device("meta"):
        layer = nn.Linear(in_features, out_features, bias=False)
    return [dict(params=[layer.weight], grouping=grouping, lam=traffic.LAM)]


def _bytes_per_element(passes: list[traffic.Pass], numel: int) -> float:
    """DRAM bytes of the element arrays and the state (tables left out) per element."""
    return sum(sum(p.dram_read().values()) + sum(p.written.values()) for p in passes) / numel


def test_second_pass_rereads_dram_only_past_l2():
    # 4096 x 4096 input_channel: O > 64 rows, so every group set takes two passes; its
    # 268 MB of fp32 elements exceed 50 MB of L2 but not 1 TB. Besides the elements: one
    # mask byte per group, t and A.
    groups = _linear_groups(4096, 4096, "input_channel")
    numel, state = 4096 * 4096, 4096 + 2 * 4 * 2
    small_l2 = traffic.step_passes(groups, 50e6)
    huge_l2 = traffic.step_passes(groups, 1e12)
    assert [p.kernel for p in small_l2] == [
        "_rmda_scalars_kernel", "_rmda_grouped_kernel", "_rmda_grouped_apply_kernel"]
    # L2 holds it all: the floor, 24 B; else the apply pass reads V and W0 again, 32 B
    assert _bytes_per_element(huge_l2, numel) == pytest.approx(24 + state / numel)
    assert _bytes_per_element(small_l2, numel) == pytest.approx(32 + state / numel)


def test_one_pass_layer_moves_the_floor():
    # 64 x 4096 input_channel: each group set fits one tile, one pass, 24 B/elt in fp32
    numel, state = 64 * 4096, 4096 + 2 * 4 * 2
    passes = traffic.step_passes(_linear_groups(64, 4096, "input_channel"), 50e6)
    assert [p.kernel for p in passes] == ["_rmda_scalars_kernel", "_rmda_grouped_kernel"]
    assert _bytes_per_element(passes, numel) == pytest.approx(24 + state / numel)


def test_table_for_a_torchvision_model(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "traffic.json"
    assert traffic.main(["resnet18", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(r["grouping"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {(g, d) for g in traffic.GROUPINGS for d in traffic.DTYPES}
    assert result["numel"] == 11_689_512
    # grouping none moves the floor plus the tables: 24 B fp32, 16 B bf16 params
    assert rows["none", "fp32"]["total"] == pytest.approx(24.0, abs=0.05)
    assert rows["none", "bf16"]["total"] == pytest.approx(16.0, abs=0.05)
    assert rows["none", "fp32"]["ratio_to_sgd"] == pytest.approx(1.2, abs=0.01)
    # two param groups (weights, the rest), each a scalars and an element launch
    assert rows["none", "fp32"]["launches"] == 4
    assert "targets: <= 25 B/elt fp32" in printed
