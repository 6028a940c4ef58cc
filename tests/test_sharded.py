"""Sharded training on 2 CPU processes over gloo (tests/sharded_harness.py): RMDA on DTensor
parameters (placed by hand as Shard(0) or Shard(1), and FSDP2's fully_shard) against a
single-process run of the same steps, every grouping; ZeroRedundancyOptimizer with the
scheduler, the tracker and the structure report; a torch.distributed.checkpoint round trip;
a rank that dies mid-run."""
from __future__ import annotations

import os
import signal
import tempfile
import time

import pytest
import torch
from torch import nn

import rmda_fused
from conftest import FAST_BACKENDS
from sharded_harness import (
    SHAPES, assert_state_matches, full_mask, local_part, mesh, noisy, problem, run_ranks,
    start_ranks,
)
from rmda_fused.sharding import apply_prox_point, local

if not torch.distributed.is_available():  # pragma: no cover - every CI build has it
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

GROUPINGS = ("input_channel", "output_channel", "elementwise", "coupled", "none")
# coupled groups written by hand for SHAPES: ids shared by columns of several tensors, two
# columns of one tensor, and ids of their own
CHANNEL_GROUPS = [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 5, 5]),
                  torch.tensor([6, 6, 2, 7, 8]), None, torch.tensor([9, 10, 4])]
LAM = 0.6
HYPER = dict(lr=0.05, momentum=0.3, lam=LAM)


def _param_groups(grouping, params):
    group = dict(HYPER, params=params, grouping=grouping)
    if grouping == "coupled":
        group["channel_groups"] = CHANNEL_GROUPS
    return [group]


def _assert_some_groups_zero(ref, params):
    masks = [ref.state[q]["zero_mask"] for q in params if "zero_mask" in ref.state[q]]
    flags = torch.cat(masks)
    assert flags.any() and not flags.all(), "the problem zeroes no group, or all of them"


def _dtensor_groupings(rank, dim, backend):
    from torch.distributed.tensor import Shard, distribute_tensor
    device_mesh = mesh()
    for grouping in GROUPINGS:
        values, directions = problem(SHAPES, LAM)
        params = [nn.Parameter(distribute_tensor(v.clone(), device_mesh,
                                                 [Shard(min(dim, v.dim() - 1))],
                                                 src_data_rank=None)) for v in values]
        ref_params = [nn.Parameter(v.clone()) for v in values]
        opt = rmda_fused.RMDA(_param_groups(grouping, params), backend=backend)
        ref = rmda_fused.RMDA(_param_groups(grouping, ref_params), backend=backend)
        scheduler = rmda_fused.MultiStepRestart(opt, milestones=[25], gamma=0.5)
        ref_scheduler = rmda_fused.MultiStepRestart(ref, milestones=[25], gamma=0.5)
        gen = torch.Generator().manual_seed(1)
        for k in range(50):
            grads = noisy(directions, gen)
            if k == 10:  # on rank 0's shard only: every rank must skip this step
                grads[0].view(-1)[0] = float("nan")
            for p, q, g in zip(params, ref_params, grads):
                p.grad = distribute_tensor(g, device_mesh, p.placements, src_data_rank=None)
                q.grad = g
            opt.step()
            ref.step()
            scheduler.step()
            ref_scheduler.step()
        assert_state_matches(opt, params, ref, ref_params)
        if grouping != "none":
            _assert_some_groups_zero(ref, ref_params)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(local(opt.prox_point(p)),
                                       local_part(ref.prox_point(q), p), rtol=0, atol=1e-6)
        report, ref_report = (rmda_fused.structure.group_sparsity(o) for o in (opt, ref))
        assert [(t.groups, t.zero_count) for t in report.tensors] == \
               [(t.groups, t.zero_count) for t in ref_report.tensors]
        assert report.fraction == ref_report.fraction
        opt.apply_prox_point()
        ref.apply_prox_point()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(local(p.detach()), local_part(q.detach(), p),
                                       rtol=0, atol=1e-6)
        w_report = rmda_fused.structure.group_sparsity(opt, of="W")
        ref_w_report = rmda_fused.structure.group_sparsity(ref, of="W")
        assert [t.zero_count for t in w_report.tensors] == \
               [t.zero_count for t in ref_w_report.tensors]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_dtensor_parameters_match_one_process_in_every_grouping(dim, backend):
    run_ranks(_dtensor_groupings, dim, backend)
