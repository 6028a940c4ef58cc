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
from rmda_fused.kernels import rmda_grouped  # noqa: E402


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


def test_second_walk_rereads_dram_only_past_the_l2_model():
    # 4096 x 4096 input_channel: a group (a column, 4096 elements) fits the band budget
    # alone, so a band is one group: 4096 rows of one element, 128 tile rows > 64, walked
    # twice. With a 50 MB L2 the re-read of V and W0 hits, with 1 MB it does not. Besides
    # the elements: one mask byte per group, t and A read and written.
    groups = _linear_groups(4096, 4096, "input_channel")
    numel, state = 4096 * 4096, 4096 + 2 * 4 * 2
    small_l2 = traffic.step_passes(groups, 1e6)
    l2 = traffic.step_passes(groups, 50e6)
    assert [p.kernel for p in l2] == ["_rmda_grouped_kernel"]
    assert l2[0].programs == rmda_grouped.PROGRAMS and l2[0].two_walk_elements == numel
    assert _bytes_per_element(l2, numel) == pytest.approx(24 + state / numel)
    assert _bytes_per_element(small_l2, numel) == pytest.approx(32 + state / numel)


def test_group_past_the_band_budget_rereads_dram():
    # input_channel groups of 20000 rows: more than the band budget of 50 MB, one group per
    # band, the second walk from DRAM
    outer = 20000
    assert outer > rmda_grouped.band_budget(rmda_grouped.band_footprint(4, 4, 4))
    passes = traffic.step_passes(_linear_groups(outer, 4, "input_channel"), 50e6)
    assert _bytes_per_element(passes, 4 * outer) == pytest.approx(32 + (4 + 16) / (4 * outer))


def test_one_walk_layer_moves_the_floor():
    # 64 x 4096 input_channel: bands of 32 groups, 64 rows: one tile, one walk, 24 B in fp32
    numel, state = 64 * 4096, 4096 + 2 * 4 * 2
    passes = traffic.step_passes(_linear_groups(64, 4096, "input_channel"), 50e6)
    assert [p.kernel for p in passes] == ["_rmda_grouped_kernel"]
    assert passes[0].two_walk_elements == 0 and passes[0].programs == 4096 // 32
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
    # two param groups (weights, the rest), one launch each, in every grouping; channel
    # groups at the floor too (every band's second walk fits the L2 model)
    assert {r["launches"] for r in rows.values()} == {2}
    for grouping in ("input_channel", "output_channel"):
        assert rows[grouping, "fp32"]["total"] == pytest.approx(24.0, abs=0.05)
        assert rows[grouping, "bf16"]["total"] == pytest.approx(16.0, abs=0.05)
    assert "targets: <= 25 B/elt fp32" in printed
