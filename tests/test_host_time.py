"""``python -m benchmarks.host_time`` runs, counts the tensors it says, and puts back the
kernels it stubs out (a later step must run for real)."""
from __future__ import annotations

import torch

import rmda_fused
from benchmarks import host_time
from rmda_fused import functional


def test_host_time_runs_and_restores_the_kernels():
    before = [getattr(module, name) for module, name in host_time._LAUNCHES]
    assert any(name == "run_planned" for _, name in host_time._LAUNCHES)
    result = host_time.main(["--copies", "1", "2", "--steps", "5", "--rounds", "2"])
    assert sorted(result) == [161, 322] and all(t > 0 for t in result.values())
    assert [getattr(module, name) for module, name in host_time._LAUNCHES] == before
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.ones(2, 3)
    rmda_fused.RMDA([p], lr=0.1).step()
    assert not torch.equal(p, torch.ones(2, 3))  # the real kernels ran
