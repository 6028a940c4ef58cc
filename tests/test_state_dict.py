"""Checkpointing, torch.optim integration (schedulers, closure, zero_grad, add_param_group), AMP."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import GradStream, compare, make_groups, set_grads

STATE_KEYS = ("initial", "dual", "step", "alpha", "zero_mask")


def precomputed_grads(groups, steps, seed=1):
    stream = GradStream(groups, seed)
    return [stream.next(k) for k in range(1, steps + 1)]


# Short runs (a Triton backend runs in its slow interpreter without a GPU): restart at 10,
# lr halved at 25, checkpoint at 20 (after the restart), 40 steps in all.
RESTART_AT, LR_CHANGE_AT, SAVE_AT, TOTAL = 10, 25, 20, 40


def drive(opt, params, grads, start, end, restart_at=(RESTART_AT,), lr_change_at=LR_CHANGE_AT):
    """Steps start+1..end (1-based) with the given gradients; same events every time."""
    for k in range(start + 1, end + 1):
        set_grads(params, grads[k - 1])
        opt.step()
        if k == lr_change_at:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.5
        if k in restart_at:
            opt.restart()


def clone_groups(groups):
    """The same param groups over fresh copies of the parameters (as a restarted job has)."""
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = [torch.nn.Parameter(p.detach().clone()) for p in g["params"]]
        out.append(g)
    return out


def assert_identical(opt_a, params_a, opt_b, params_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}: W differs"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (i, key, sa[key].dtype, sb[key].dtype)
            assert sa[key].device == sb[key].device, (i, key)
            assert torch.equal(sa[key], sb[key]), f"param {i}: state {key} differs"


def test_resume_is_bit_identical(backend, device):
    """Checkpoint mid-run (after a restart) through torch.save/torch.load into a BytesIO,
    resume in a fresh optimizer over copies of the parameters: bit-identical to not stopping."""
    groups, _ = make_groups(torch.float32, device)
    grads = precomputed_grads(groups, TOTAL)
    opt = rmda_fused.RMDA(groups, backend=backend)
    params = [p for g in groups for p in g["params"]]
    drive(opt, params, grads, 0, SAVE_AT)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # serialises now: later steps cannot leak into it
    resumed_groups = clone_groups(groups)  # the parameters as a checkpoint holds them
    drive(opt, params, grads, SAVE_AT, TOTAL)  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the state dict is plain tensors and numbers
    assert set(saved["state"][0]) == set(STATE_KEYS)
    resumed = rmda_fused.RMDA(resumed_groups, backend=backend)
    resumed.load_state_dict(saved)
    resumed_params = [p for g in resumed_groups for p in g["params"]]
    drive(resumed, resumed_params, grads, SAVE_AT, TOTAL)
    assert_identical(opt, params, resumed, resumed_params)


def test_state_dict_is_a_snapshot_when_deep_copied():
    """A deepcopy of state_dict() resumes identically too (no aliasing of live state)."""
    groups, _ = make_groups(torch.float64)
    grads = precomputed_grads(groups, TOTAL)
    opt = rmda_fused.RMDA(groups)
    params = [p for g in groups for p in g["params"]]
    drive(opt, params, grads, 0, SAVE_AT)
    saved = copy.deepcopy(opt.state_dict())
    resumed_groups = clone_groups(groups)
    drive(opt, params, grads, SAVE_AT, TOTAL)
    resumed = rmda_fused.RMDA(resumed_groups)
    resumed.load_state_dict(saved)
    resumed_params = [p for g in resumed_groups for p in g["params"]]
    drive(resumed, resumed_params, grads, SAVE_AT, TOTAL)
    assert_identical(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_state_dtypes_survive_save_and_load(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = torch.nn.Parameter(torch.randn(6, 4, 3, 3).to(dtype))
    b = torch.nn.Parameter(torch.randn(6).to(dtype))
    opt = rmda_fused.RMDA([dict(params=[p]), dict(params=[b], grouping="none")], lr=0.1, lam=0.1)
    for _ in range(3):
        p.grad, b.grad = torch.randn_like(p), torch.randn_like(b)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    p2 = torch.nn.Parameter(p.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    opt2 = rmda_fused.RMDA([dict(params=[p2]), dict(params=[b2], grouping="none")], lr=0.1, lam=0.1)
    opt2.load_state_dict(torch.load(buf))
    for q, q2 in ((p, p2), (b, b2)):
        s, s2 = opt.state[q], opt2.state[q2]
        assert s2["initial"].dtype == dtype
        assert s2["dual"].dtype == acc, "V must stay in fp32 (fp64 for fp64 params), not the param dtype"
        assert s2["step"].dtype == acc and s2["alpha"].dtype == acc
        for key in s:
            assert torch.equal(s[key], s2[key]), key
    assert opt2.state[p2]["zero_mask"].dtype == torch.bool
    assert "zero_mask" not in opt2.state[b2]
    # and the loaded optimizer keeps going identically
    g1, g2 = torch.randn_like(p), torch.randn_like(b)
    for o, (q, r) in ((opt, (p, b)), (opt2, (p2, b2))):
        q.grad, r.grad = g1.clone(), g2.clone()
        o.step()
    assert torch.equal(p.detach(), p2.detach()) and torch.equal(b.detach(), b2.detach())


@pytest.mark.parametrize("direction", ["from_reference", "to_reference"])
def test_cross_backend_resume(backend, device, direction):
    """Save on one backend, resume on another: matches the float64 reference throughout."""
    if backend == "reference" and direction == "to_reference":
        pytest.skip("same backend both ways: covered by from_reference")
    first_name, second_name = ("reference", backend) if direction == "from_reference" else (backend, "reference")
    groups, _ = make_groups(torch.float32, device)
    grads = precomputed_grads(groups, TOTAL)
    ref = Float64RMDA(groups)
    first = rmda_fused.RMDA(groups, backend=first_name)
    params = [p for g in groups for p in g["params"]]
    drive(first, params, grads, 0, SAVE_AT)
    saved = copy.deepcopy(first.state_dict())

    resumed_groups = clone_groups(groups)
    second = rmda_fused.RMDA(resumed_groups, backend=second_name)
    second.load_state_dict(saved)
    # load_state_dict restores the saved hyperparameters, the saved backend name included:
    # choose the backend to continue with explicitly
    for g in second.param_groups:
        g["backend"] = second_name
    resumed_params = [p for g in resumed_groups for p in g["params"]]
    drive(second, resumed_params, grads, SAVE_AT, TOTAL)

    for k in range(1, TOTAL + 1):
        ref.step(grads[k - 1])
        if k == LR_CHANGE_AT:
            for g in ref.groups:
                g["lr"] *= 0.5
        if k == RESTART_AT:
            ref.restart()
    failures = compare(second, resumed_params, ref)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR"])
def test_torch_lr_schedulers(sched):
    groups, _ = make_groups(torch.float64)
    grads = precomputed_grads(groups, 60)
    ref = Float64RMDA(groups)
    opt = rmda_fused.RMDA(groups)
    params = [p for g in groups for p in g["params"]]
    if sched == "StepLR":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.001)
    initial = [g["lr"] for g in opt.param_groups]
    for k in range(60):
        for og, rg in zip(opt.param_groups, ref.groups):
            rg["lr"] = og["lr"]  # the lr the scheduler set for this step
        set_grads(params, grads[k])
        opt.step()
        ref.step(grads[k])
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] != initial  # the schedule did act
    failures = compare(opt, params, ref)
    assert not failures, "\n".join(failures)


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, 1, 1, dtype=torch.float64))
    target = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    opt = rmda_fused.RMDA([w], lr=0.1, momentum=0.5, lam=0.01)
    ref = Float64RMDA([dict(params=[w], lr=0.1, momentum=0.5, lam=0.01, grouping="input_channel")])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = 0.5 * ((w - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        expected_grad = (w.detach() - target).clone()
        expected_loss = 0.5 * float(((w.detach() - target) ** 2).sum())
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and float(loss.detach()) == pytest.approx(expected_loss, rel=1e-12)
        ref.step([expected_grad])
    assert calls == [True] * 5
    assert not compare(opt, [w], ref)
    assert opt.step() is None  # no closure: None


def test_amp_grad_scaler(backend, device):
    """GradScaler passes grad_scale/found_inf: an inf step changes nothing, not even t."""
    groups, _ = make_groups(torch.float32, device)
    params = [p for g in groups for p in g["params"]]
    grads = precomputed_grads(groups, 12)
    ref = Float64RMDA(groups)
    opt = rmda_fused.RMDA(groups, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=1000)
    inf_steps = {1, 6}  # the very first step (state not yet started) and one mid-run
    for k in range(1, 13):
        g_k = grads[k - 1]
        opt.zero_grad()
        # loss = sum <p, g>: its gradient is exactly g; scaled by a power of two, exactly
        loss = sum((p * g).sum() for p, g in zip(params, g_k) if g is not None)
        scaler.scale(loss).backward()
        if k in inf_steps:
            params[0].grad.view(-1)[0] = float("inf")
            before_w = [p.detach().clone() for p in params]
            before_state = {id(p): {key: v.clone() for key, v in opt.state[p].items()}
                            for p in params if p in opt.state}
        if k == 9:  # the explicit unscale_ path: the optimizer then gets no grad_scale
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if k in inf_steps:
            for i, (p, w) in enumerate(zip(params, before_w)):
                assert torch.equal(p.detach(), w), f"step {k}: param {i} changed on found_inf"
                for key, value in before_state.get(id(p), {}).items():
                    assert torch.equal(opt.state[p][key], value), f"step {k}: state {key} of param {i} changed"
                if p in opt.state:
                    assert float(opt.state[p]["step"]) == len([j for j in range(1, k) if j not in inf_steps
                                                              and grads[j - 1][i] is not None])
            continue
        ref.step(g_k)
    assert scaler.get_scale() < 2.0 ** 10  # the scaler did see the infs
    failures = compare(opt, params, ref)
    assert not failures, "\n".join(failures)


def test_zero_grad():
    groups, _ = make_groups(torch.float64)
    params = [p for g in groups for p in g["params"]]
    grads = precomputed_grads(groups, 3)
    ref = Float64RMDA(groups)
    opt = rmda_fused.RMDA(groups)
    set_grads(params, grads[0])
    opt.step()
    ref.step(grads[0])
    opt.zero_grad()  # set_to_none: the next step has no gradients and is a no-op
    assert all(p.grad is None for p in params)
    opt.step()
    ref.step([None] * len(params))
    set_grads(params, grads[1])
    opt.zero_grad(set_to_none=False)  # zero gradients: a real step with g = 0
    assert all(p.grad is None or not p.grad.any() for p in params)
    opt.step()
    ref.step([None if g is None else torch.zeros_like(g) for g in grads[1]])
    failures = compare(opt, params, ref)
    assert not failures, "\n".join(failures)
    assert float(opt.state[params[0]]["step"]) == 2


def test_add_param_group_later():
    groups, _ = make_groups(torch.float64)
    params = [p for g in groups for p in g["params"]]
    grads = precomputed_grads(groups, 30)
    ref = Float64RMDA(groups)
    opt = rmda_fused.RMDA([groups[0]], lr=0.2, momentum=0.25, lam=0.7, grouping="input_channel")
    n0 = len(groups[0]["params"])
    for k in range(1, 31):
        if k == 11:
            for g in groups[1:]:
                opt.add_param_group(g)
        active = len(params) if k > 10 else n0
        g_k = [g if i < active else None for i, g in enumerate(grads[k - 1])]
        set_grads(params, g_k)
        opt.step()
        ref.step(g_k)
    assert [g["grouping"] for g in opt.param_groups] == [g["grouping"] for g in groups]
    assert all(g["backend"] == "auto" for g in opt.param_groups)
    failures = compare(opt, params, ref)
    assert not failures, "\n".join(failures)
    # a group without some keys takes the constructor's defaults
    extra = torch.nn.Parameter(torch.randn(10, 12, dtype=torch.float64))
    opt.add_param_group(dict(params=[extra]))
    added = opt.param_groups[-1]
    assert (added["lr"], added["momentum"], added["lam"], added["grouping"]) == (0.2, 0.25, 0.7, "input_channel")


@pytest.mark.parametrize("make", [
    lambda ps: rmda_fused.RMDA(ps, lr=0.1, lam=0.5),
    lambda ps: rmda_fused.ProxSGD(ps, lr=0.1, lam=0.5),
])
def test_state_dict_saved_with_the_old_mask_key_loads(make):
    """State dicts saved before the mask's key was renamed (zero_groups -> zero_mask)."""
    p = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
    opt = make([p])
    p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    old = {**saved, "state": {pid: {("zero_groups" if k == "zero_mask" else k): v
                                    for k, v in entry.items()}
                              for pid, entry in saved["state"].items()}}
    fresh = make([torch.nn.Parameter(p.detach().clone())])
    fresh.load_state_dict(old)
    (q,) = fresh.param_groups[0]["params"]
    assert "zero_groups" not in fresh.state[q]
    assert fresh.state[q]["zero_mask"].dtype == torch.bool
    assert torch.equal(fresh.state[q]["zero_mask"], opt.state[p]["zero_mask"])
