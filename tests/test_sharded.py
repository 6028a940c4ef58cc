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
from datetime import timedelta

import pytest
import torch
from torch import nn

import rmda_fused
from sharded_harness import (
    SHAPES, assert_runs_on, assert_state_matches, full_mask, local_part, mesh, noisy, problem, Ranks,
    start_ranks,
)
from rmda_fused.sharding import apply_prox_point, local

if not torch.distributed.is_available():  # pragma: no cover - every CI build has it
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

@pytest.fixture(scope="module")
def ranks():
    pool = Ranks()
    yield pool
    pool.close()


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


def _assert_state_dicts_load(opt, params, ref, ref_params, grouping, backend, gen,
                             directions):
    """A twin loading the sharded state dict steps as the optimizer does, bit for bit; one
    loading the single-process state dict steps as the single-process run does."""
    from torch.distributed.tensor import distribute_tensor
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    twin = rmda_fused.RMDA(_param_groups(grouping, twins), backend=backend)
    twin.load_state_dict(opt.state_dict())
    from_one = [nn.Parameter(distribute_tensor(q.detach().clone(), p.device_mesh,
                                               p.placements, src_data_rank=None))
                for p, q in zip(params, ref_params)]
    loaded = rmda_fused.RMDA(_param_groups(grouping, from_one), backend=backend)
    loaded.load_state_dict(ref.state_dict())
    for i, (q, g) in enumerate(zip(ref_params, noisy(directions, gen))):
        p = params[i]
        for x in (p, twins[i], from_one[i]):
            x.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        q.grad = g
    for o in (opt, twin, loaded, ref):
        o.step()
    for p, q in zip(params, twins):
        assert torch.equal(local(p.detach()), local(q.detach()))
    assert_state_matches(loaded, from_one, ref, ref_params)


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
        trackers = [rmda_fused.IdentificationTracker(o) for o in (opt, ref)]
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
            for tracker in trackers:
                tracker.update(k)
        assert_state_matches(opt, params, ref, ref_params)
        assert trackers[0].flips == trackers[1].flips
        assert trackers[0].last_change == trackers[1].last_change
        assert_runs_on(opt, backend)
        if grouping != "none":
            _assert_some_groups_zero(ref, ref_params)
        _assert_state_dicts_load(opt, params, ref, ref_params, grouping, backend, gen,
                                 directions)
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


@pytest.mark.parametrize("dim", [0, 1])
def test_dtensor_parameters_match_one_process_in_every_grouping(ranks, dim, fast_backend):
    ranks.run(_dtensor_groupings, dim, fast_backend)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 7))


# coupled ids written by hand for _small_model's weights: conv2 shares a group with conv1,
# the linear layer one with conv2, and reads each channel of conv2 at 4 positions
_MODEL_CHANNEL_GROUPS = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4, 5, 6, 7]),
                         torch.tensor([8] * 4 + [9] * 4 + [3] * 4 + [10] * 4 + [11] * 4)]


def _model_groups(model, grouping, lam=0.08):
    if grouping != "coupled":
        return rmda_fused.param_groups(model, lam=lam, grouping=grouping, lr=0.05,
                                       momentum=0.3)
    weights = [m.weight for m in model if hasattr(m, "weight")]
    biases = [m.bias for m in model if hasattr(m, "bias")]
    return [dict(params=weights + biases, lam=lam, grouping="coupled", lr=0.05, momentum=0.3,
                 channel_groups=_MODEL_CHANNEL_GROUPS + [None] * len(biases))]


def _fully_shard(model):
    from torch.distributed.fsdp import fully_shard
    device_mesh = mesh()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=device_mesh)
    return fully_shard(model, mesh=device_mesh)


def _batch(step, rank):
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(100 * step + rank))


def _fsdp2_groupings(rank, backend):
    for grouping in ("input_channel", "output_channel", "elementwise", "coupled"):
        model = _small_model()
        ref_model = _small_model()
        _fully_shard(model)
        params, ref_params = list(model.parameters()), list(ref_model.parameters())
        opt = rmda_fused.RMDA(_model_groups(model, grouping), backend=backend)
        ref = rmda_fused.RMDA(_model_groups(ref_model, grouping), backend=backend)
        for k in range(50):
            model(_batch(k, rank)).square().mean().backward()
            # the single-process run steps with the very gradients FSDP2 reduced
            for p, q in zip(params, ref_params):
                q.grad = p.grad.full_tensor()
            opt.step()
            ref.step()
            opt.zero_grad()
            if k == 25:
                opt.restart()
                ref.restart()
        order = [p for g in opt.param_groups for p in g["params"]]
        ref_order = [q for g in ref.param_groups for q in g["params"]]
        assert_state_matches(opt, order, ref, ref_order)
        assert_runs_on(opt, backend)
        _assert_some_groups_zero(ref, ref_order)
        # memory per rank: W0 and V, each the size of the local shard
        shard_bytes = sum(local(p).numel() * local(p).element_size() for p in order)
        state_bytes = sum(local(opt.state[p][key]).numel() * local(opt.state[p][key]).element_size()
                          for p in order for key in ("initial", "dual"))
        assert state_bytes == 2 * shard_bytes
        assert shard_bytes < sum(q.numel() * q.element_size() for q in ref_order)


def test_fsdp2_fully_shard_matches_one_process(ranks, fast_backend):
    ranks.run(_fsdp2_groupings, fast_backend)


def _zero_redundancy(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model, ref_model = _small_model(), _small_model()
    zero = ZeroRedundancyOptimizer(_model_groups(model, "input_channel", lam=0.2),
                                   optimizer_class=rmda_fused.RMDA)
    ref = rmda_fused.RMDA(_model_groups(ref_model, "input_channel", lam=0.2))
    held = sum(p.numel() for g in zero.optim.param_groups for p in g["params"])
    assert 0 < held < sum(p.numel() for p in model.parameters())  # each rank holds a part
    schedulers = [rmda_fused.MultiStepRestart(o, milestones=[3], gamma=0.5,
                                              momentum_schedule="iclr") for o in (zero, ref)]
    trackers = [rmda_fused.IdentificationTracker(o) for o in (zero, ref)]
    k = 0
    for _ in range(6):
        for _ in range(4):
            for m in (model, ref_model):  # the same batch on every rank, as DDP's mean
                m.zero_grad()
                m(_batch(k, 0)).square().mean().backward()
            zero.step()
            ref.step()
            for tracker in trackers:
                tracker.update(k)
            k += 1
        for scheduler in schedulers:
            scheduler.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert zero.param_groups[0]["momentum"] == ref.param_groups[0]["momentum"] == 0.6
    report, ref_report = (rmda_fused.structure.group_sparsity(o) for o in (zero, ref))
    assert 0 < ref_report.fraction < 1
    assert report.fraction == ref_report.fraction
    assert [(t.groups, t.zero_count) for t in report.tensors] == \
           [(t.groups, t.zero_count) for t in ref_report.tensors]
    zeros, ref_zeros = trackers
    assert zeros.flips == ref_zeros.flips and zeros.last_change == ref_zeros.last_change
    apply_prox_point(zero)
    apply_prox_point(ref)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert rmda_fused.structure.group_sparsity(zero, of="W").fraction == ref_report.fraction


def test_zero_redundancy_optimizer_reports_model_wide_numbers(ranks):
    ranks.run(_zero_redundancy)


def _checkpoint_round_trip(rank, directory, backend):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    def run(model, opt, steps):
        for k in steps:
            model(_batch(k, rank)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    # output_channel groups lie whole on the ranks under Shard(0) (their masks are DTensors),
    # input_channel groups are cut (their masks are plain, the same on every rank)
    for grouping in ("output_channel", "input_channel"):
        def make():
            model = _small_model()
            _fully_shard(model)
            return model, rmda_fused.RMDA(_model_groups(model, grouping), backend=backend)

        checkpoint = os.path.join(directory, grouping)
        model, opt = make()
        run(model, opt, range(6))
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint)
        run(model, opt, range(6, 10))
        resumed, resumed_opt = make()
        state = {"model": get_model_state_dict(resumed),
                 "optim": get_optimizer_state_dict(resumed, resumed_opt)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
        run(resumed, resumed_opt, range(6, 10))
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(local(p.detach()), local(q.detach()))
            assert opt.state[p].keys() == resumed_opt.state[q].keys()
            for key, value in opt.state[p].items():
                other = resumed_opt.state[q][key]
                assert type(value) is type(other), key
                assert torch.equal(full_mask(value), full_mask(other)), key


def test_distributed_checkpoint_resumes_bit_identically(ranks, fast_backend):
    with tempfile.TemporaryDirectory() as directory:
        ranks.run(_checkpoint_round_trip, directory, fast_backend)


def _refused_meshes(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor
    two_dims = init_device_mesh("cpu", (2, 1))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 4), two_dims, [Shard(0), Shard(1)],
                                       src_data_rank=None))
    with pytest.raises(ValueError, match=r"parameter 0: RMDA takes DTensor parameters on a "
                                         r"1-D device mesh; got a 2-D mesh"):
        rmda_fused.RMDA([p], lam=0.1)
    partial = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh(), [Shard(0)],
                                             src_data_rank=None).redistribute(
                                                 placements=[Partial()]))
    with pytest.raises(ValueError, match="placed as P"):
        rmda_fused.RMDA([partial], lam=0.1)


def test_dtensors_rmda_cannot_step_are_refused_by_name(ranks):
    ranks.run(_refused_meshes)


def _killed_rank(rank, report, stop):
    from torch.distributed.tensor import Shard, distribute_tensor
    device_mesh = mesh()
    value = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(distribute_tensor(value, device_mesh, [Shard(0)], src_data_rank=None))
    # input_channel groups, cut by Shard(0): the step all-reduces
    opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1, backend="reference")
    for step in range(2):
        if rank == 1 and step == 1:
            os.kill(os.getpid(), stop)
        p.grad = distribute_tensor(torch.ones(6, 4), device_mesh, [Shard(0)],
                                   src_data_rank=None)
        start = time.monotonic()
        try:
            opt.step()
        except RuntimeError as exc:
            with open(report, "w") as f:
                f.write(f"{time.monotonic() - start:.1f}\n{exc}")
            os._exit(0)  # the process group cannot be torn down with a peer gone


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_lost_rank_ends_the_others_with_an_error(stop):
    """A rank that dies closes its sockets: the others' next all-reduce fails at once. One
    that stops answering is caught by the process group's timeout (3 s here)."""
    with tempfile.TemporaryDirectory() as directory:
        report = os.path.join(directory, "report")
        procs = start_ranks(_killed_rank, report, stop, timeout=timedelta(seconds=3))
        procs[0].join(timeout=60)
        hung = procs[0].is_alive()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        assert not hung, "rank 0 hung after its peer was lost"
        assert procs[0].exitcode == 0
        with open(report) as f:
            seconds, message = f.read().split("\n", 1)
        assert "RMDA: the all-reduce of" in message and "failed" in message, message
        assert float(seconds) < 30
