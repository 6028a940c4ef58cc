"""MultiStepRestart: lr milestones that also restart the dual averaging, and momentum schedules."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import compare

STEPS_PER_EPOCH = 3


def make(momentum=(0.1, 0.2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    groups = [dict(params=[w], lr=0.1, momentum=momentum[0], lam=0.02, grouping="input_channel"),
              dict(params=[b], lr=0.1, momentum=momentum[1], lam=0.0, grouping="none")]
    return groups, [w, b]


def grads_for(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.3 for p in params]


def run_epochs(opt, params, sched, epochs, start_step=0, on_step=None):
    step = start_step
    for _ in range(epochs):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()
            if on_step:
                on_step(step)
        sched.step()
    return step


def assert_just_restarted(opt, params):
    for p in params:
        state = opt.state[p]
        assert torch.equal(state["initial"], p.detach())
        assert not state["dual"].any()
        assert float(state["step"]) == 0 and float(state["alpha"]) == 0


def test_lr_scaled_and_restart_at_milestones():
    groups, params = make()
    opt = rmda_fused.RMDA(groups)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[2, 4], gamma=0.1)
    ref = Float64RMDA(groups)
    step = 0
    for epoch in range(1, 7):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            g = grads_for(params, step)
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
            ref.step(g)
        w_before = [p.detach().clone() for p in params]
        sched.step()
        assert all(torch.equal(p.detach(), w) for p, w in zip(params, w_before)), "restart moved W"
        expected_lr = 0.1 * 0.1 ** sum(epoch >= m for m in (2, 4))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected_lr] * 2, rel=1e-12)
        if epoch in (2, 4):
            assert_just_restarted(opt, params)
            for rg in ref.groups:
                rg["lr"] *= 0.1
            ref.restart()
        else:  # no restart between milestones: t keeps counting
            since = (epoch - (4 if epoch > 4 else 2 if epoch > 2 else 0)) * STEPS_PER_EPOCH
            assert float(opt.state[params[0]]["step"]) == since
        # momentum untouched without a momentum schedule
        assert [g["momentum"] for g in opt.param_groups] == [0.1, 0.2]
    failures = compare(opt, params, ref)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("c0, gamma", [(0.05, 0.1), (0.3, 0.5)])
def test_iclr_momentum_schedule(c0, gamma):
    groups, params = make(momentum=(c0, c0 / 2))
    opt = rmda_fused.RMDA(groups)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[2, 4, 5], gamma=gamma, momentum_schedule="iclr")
    expected = [c0, c0 / 2]
    for epoch in range(1, 7):
        run_epochs(opt, params, sched, 1, start_step=10 * epoch)
        if epoch in (2, 4, 5):
            expected = [min(c / gamma, 1.0) for c in expected]
            assert_just_restarted(opt, params)
        assert [g["momentum"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == 1.0  # the schedule did reach c = 1


def test_sqrt_momentum_schedule():
    c0 = (0.25, 0.1)
    groups, params = make(momentum=c0)
    opt = rmda_fused.RMDA(groups)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[2, 4], gamma=0.1, momentum_schedule="sqrt")
    used = []  # the momentum each optimizer step runs with
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append([g["momentum"] for g in o.param_groups]))

    w = params[0]
    inferred = []

    def on_step(step):
        # the momentum the update really used: W_new = (1-c) W_old + c z
        z = opt.prox_point(w)
        d = (z - w_old[0]).flatten()
        sel = d.abs() > 1e-3
        c = ((w.detach() - w_old[0]).flatten()[sel] / d[sel])
        inferred.append(float(c.mean()))
        assert float(c.max() - c.min()) < 1e-9
        w_old[0] = w.detach().clone()

    w_old = [w.detach().clone()]
    before = run_epochs(opt, params, sched, 4, on_step=on_step)  # through the last milestone
    assert used == [list(c0)] * before  # unchanged before the last milestone
    assert_just_restarted(opt, params)
    run_epochs(opt, params, sched, 6, start_step=before, on_step=on_step)  # k = 1..18
    after = used[before:]
    for k, momenta in enumerate(after, start=1):
        assert momenta == pytest.approx([min(c * math.sqrt(k), 1.0) for c in c0], rel=1e-12), k
    assert after[-1][0] == 1.0 and after[-1][1] < 1.0  # group 0 reached c = 1 (k >= 16)
    assert inferred[:before] == pytest.approx([c0[0]] * before, abs=1e-9)
    assert inferred[before:] == pytest.approx([a[0] for a in after], abs=1e-9)


def test_state_dict_round_trip():
    groups, params = make(momentum=(0.2, 0.1))
    opt = rmda_fused.RMDA(groups)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[2, 3], gamma=0.5, momentum_schedule="sqrt")
    step = run_epochs(opt, params, sched, 4)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    assert "_hook" not in saved_sched and "optimizer" not in saved_sched

    groups2, params2 = make(momentum=(0.2, 0.1))
    for p, p2 in zip(params, params2):
        p2.data.copy_(p.detach())
    opt2 = rmda_fused.RMDA(groups2)
    sched2 = rmda_fused.MultiStepRestart(opt2, milestones=[2, 3], gamma=0.5, momentum_schedule="sqrt")
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == sched.last_epoch == 4
    assert sched2.steps_after_last_milestone == sched.steps_after_last_milestone == STEPS_PER_EPOCH

    run_epochs(opt, params, sched, 3, start_step=step)
    run_epochs(opt2, params2, sched2, 3, start_step=step)
    assert [g["momentum"] for g in opt2.param_groups] == [g["momentum"] for g in opt.param_groups]
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.steps_after_last_milestone == sched.steps_after_last_milestone == 4 * STEPS_PER_EPOCH
    for p, p2 in zip(params, params2):
        assert torch.equal(p.detach(), p2.detach())
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key


def test_gamma_one_restarts_without_changing_lr():
    groups, params = make()
    opt = rmda_fused.RMDA(groups)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[1], gamma=1.0)
    run_epochs(opt, params, sched, 1)
    assert_just_restarted(opt, params)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(milestones=[3, 2]), ValueError, r"\[3, 2\]"),
    (dict(milestones=[2, 2]), ValueError, r"\[2, 2\]"),
    (dict(milestones=[0, 2]), ValueError, r"\[0, 2\]"),
    (dict(milestones=[-1]), ValueError, r"\[-1\]"),
    (dict(milestones=[1.5]), ValueError, r"\[1.5\]"),
    (dict(milestones=[2], gamma=0.0), ValueError, "gamma.*0.0"),
    (dict(milestones=[2], gamma=1.5), ValueError, "gamma.*1.5"),
    (dict(milestones=[2], gamma=-0.1), ValueError, "gamma.*-0.1"),
    (dict(milestones=[2], momentum_schedule="cosine"), ValueError, "'cosine'"),
])
def test_validation(kwargs, error, match):
    groups, _ = make()
    opt = rmda_fused.RMDA(groups)
    with pytest.raises(error, match=match):
        rmda_fused.MultiStepRestart(opt, **kwargs)


def test_needs_an_optimizer_with_restart():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match="SGD"):
        rmda_fused.MultiStepRestart(sgd, milestones=[2])
