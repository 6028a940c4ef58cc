"""RMDA steps like a torch.optim optimizer (errors, direction, tensor lr, no-op steps): the properties PyTorch's generic optimizer
suite (TestOptimRenewed in PyTorch's test/test_optim.py) checks of every optimizer, stated
here for RMDA, on every backend.

What "no-op" means for RMDA: a parameter whose grad is None is not touched, and a step
with found_inf set (a GradScaler's skipped step) changes nothing. A zero gradient is not a
no-op in general: it leaves V as it is, but t and A advance, so z = W0 - V/sqrt(t) moves
and with lam > 0 the prox shrinks it; W follows z. Only when V is still 0 (no gradient
since the first step or the last restart) and lam == 0 is z = W0 = W and W stays put.

Every test takes every backend (the ``backend`` fixture; without a GPU, triton runs in
Triton's interpreter, tens of ms a step, so shapes are tiny and steps few), except the one
large matrix (9 configs x 4 schedulers x 2 layouts, 10 steps each), which takes the fast
CPU backends only (``fast_backend``) and would add most of a minute under the interpreter.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ExponentialLR, ReduceLROnPlateau, StepLR

import rmda_fused
from conformance_testing import (
    CONFORMANCE_MARKS, fresh, linear_problem, run_steps, set_grads, tiny_params,
)
from helpers import assert_unchanged, snapshot

pytestmark = CONFORMANCE_MARKS


# -- invalid inputs --------------------------------------------------------------------------

CONSTRUCTION_ERRORS = [
    (dict(lr=-0.1), ValueError, r"Invalid learning rate: -0\.1"),
    (dict(lr=math.nan), ValueError, "Invalid learning rate: nan"),
    (dict(lr=torch.tensor([0.1, 0.1])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate"),
    (dict(momentum=0.0), ValueError, r"Invalid momentum value: 0\.0"),
    (dict(momentum=1.5), ValueError, r"Invalid momentum value: 1\.5"),
    (dict(lam=-1.0), ValueError, r"Invalid lam value: -1\.0"),
    (dict(lam=math.inf), ValueError, "Invalid lam value: inf"),
    (dict(weight_decay=0.1), ValueError, r"Invalid weight_decay value: 0\.1"),
    (dict(grouping="rows"), ValueError, "unknown grouping 'rows'"),
    (dict(maximize=1), TypeError, "maximize must be True or False"),
    (dict(foreach=True), ValueError, "foreach=True is not supported"),
    (dict(fused=True), ValueError, "fused=True is not supported"),
    (dict(capturable=True), ValueError, "capturable=True is not supported"),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
]


@pytest.mark.parametrize("kwargs, error, match", CONSTRUCTION_ERRORS,
                         ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))
                              for k, _, _ in CONSTRUCTION_ERRORS])
def test_invalid_hyperparameters_are_refused_in_torchs_wording(backend, device, kwargs,
                                                               error, match):
    with pytest.raises(error, match=match):
        rmda_fused.RMDA(tiny_params(device), backend=backend, **kwargs)
    # the same value is refused in a param group added later, and the group is not added
    opt = rmda_fused.RMDA(tiny_params(device, shapes=((2, 2),)), backend=backend)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": tiny_params(device, seed=1), **kwargs})
    assert len(opt.param_groups) == 1


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'gpu9000'"):
        rmda_fused.RMDA(tiny_params(), backend="gpu9000")


def test_invalid_params_are_refused_as_torch_refuses_them(backend, device):
    p, q = tiny_params(device, shapes=((2, 2), (2, 2)))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be "
                                        "an iterable of Tensors or dicts"):
        rmda_fused.RMDA(p, backend=backend)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        rmda_fused.RMDA([], backend=backend)
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        rmda_fused.RMDA([p, p], backend=backend)
    with pytest.raises(ValueError, match="some parameters appear in more than one "
                                         "parameter group"):
        rmda_fused.RMDA([{"params": [p]}, {"params": [p]}], backend=backend)
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        rmda_fused.RMDA([("weight", p), q], backend=backend)
    with pytest.raises(TypeError, match="complex"):
        rmda_fused.RMDA([torch.zeros(2, 2, dtype=torch.complex64, device=device)],
                        backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        rmda_fused.RMDA([torch.zeros(2, 2, dtype=torch.int64, device=device)],
                        backend=backend)


def test_sparse_gradient_is_refused_at_the_step_and_changes_nothing(backend, device):
    params = tiny_params(device)
    opt = rmda_fused.RMDA(params, backend=backend)
    set_grads(params, seed=1)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(before, opt, params)


# -- going the right direction ---------------------------------------------------------------

CONFIGS = {
    "default": {},
    "lr": dict(lr=0.05),
    "tensor lr": dict(lr=torch.tensor(0.05)),
    "c=0.5": dict(momentum=0.5),
    "c=1": dict(momentum=1.0),
    "lam": dict(lam=1e-2),
    "lam, c=1": dict(lam=1e-2, momentum=1.0),
    "maximize": dict(maximize=True),
    "maximize, lam": dict(maximize=True, lam=1e-2),
}
SCHEDULERS = {
    "none": [],
    "StepLR": [lambda opt: StepLR(opt, step_size=3, gamma=0.5)],
    "Exponential+Plateau": [lambda opt: ExponentialLR(opt, gamma=0.9),
                            lambda opt: ReduceLROnPlateau(opt)],
    "MultiStepRestart": [lambda opt: rmda_fused.MultiStepRestart(opt, milestones=[4],
                                                                 gamma=0.5)],
}


def check_direction(backend, device, kwargs, schedulers=(), contiguous=True, steps=10):
    weight, bias, loss_fn = linear_problem(device, contiguous=contiguous)
    opt = rmda_fused.RMDA([weight, bias], backend=backend, **fresh(kwargs))
    made = [make(opt) for make in schedulers]
    initial = loss_fn().item()
    with torch.no_grad():
        start = weight.clone()
    run_steps(opt, loss_fn, steps, made)
    final = loss_fn().item()
    assert not torch.equal(weight.detach(), start)
    if kwargs.get("maximize", False):
        assert final > initial
    else:
        assert final < 0.9 * initial  # a real decrease, not a rounding wobble


@pytest.mark.parametrize("config", ["default", "tensor lr", "maximize, lam"])
def test_goes_the_right_direction(backend, device, config):
    check_direction(backend, device, CONFIGS[config], SCHEDULERS["StepLR"])


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_goes_the_right_direction_in_every_config(fast_backend, config, scheduler,
                                                  contiguous):
    check_direction(fast_backend, "cpu", CONFIGS[config], SCHEDULERS[scheduler], contiguous)


def test_param_groups_step_with_their_own_lr(backend, device):
    """Each group steps with its own lr, as if it had an optimizer of its own; a group with
    lr 0 does not move although its gradients are large."""
    weight, bias, loss_fn = linear_problem(device)
    frozen = tiny_params(device, seed=3, shapes=((3,),))[0]
    opt = rmda_fused.RMDA([{"params": [weight], "lam": 1e-2},
                           {"params": [bias], "lr": torch.tensor(0.05)},
                           {"params": [frozen], "lr": 0.0}], backend=backend)
    twins = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
    alone = [rmda_fused.RMDA([twins[0]], lam=1e-2, backend=backend),
             rmda_fused.RMDA([twins[1]], lr=torch.tensor(0.05), backend=backend)]
    frozen_start = frozen.detach().clone()
    initial = loss_fn().item()
    for k in range(6):
        opt.zero_grad()
        loss_fn().backward()
        frozen.grad = 100 * torch.randn_like(frozen)
        for twin, p in zip(twins, (weight, bias)):
            twin.grad = p.grad.clone()
        opt.step()
        for single in alone:
            single.step()
    assert loss_fn().item() < initial
    torch.testing.assert_close(frozen.detach(), frozen_start, rtol=1e-6, atol=0)
    assert opt.state[frozen]["step"].item() == 6  # it took the steps, with s = 0
    for twin, p in zip(twins, (weight, bias)):
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


# -- tensor lr -------------------------------------------------------------------------------

def test_tensor_lr_steps_like_the_same_float_lr(backend, device):
    """Also under a scheduler, which changes a tensor lr in place: the step reads the
    current value every time."""
    results = []
    for lr in (0.05, torch.tensor(0.05)):
        params = tiny_params(device)
        opt = rmda_fused.RMDA(params, lr=lr, lam=1e-2, backend=backend)
        scheduler = StepLR(opt, step_size=2, gamma=0.1)
        for k in range(5):
            set_grads(params, seed=k)
            opt.step()
            scheduler.step()
        results.append(params)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.05 * 0.1 ** 2)
    for p, q in zip(*results):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
    # A = sum of lr_t * sqrt(t), with the lr each step had
    alpha = opt.state[params[0]]["alpha"]
    expected = 0.05 * (1 + 2 ** 0.5) + 0.005 * (3 ** 0.5 + 2) + 0.0005 * 5 ** 0.5
    assert alpha.item() == pytest.approx(expected, rel=1e-6)
    lr.fill_(0.0)  # set in place, as schedulers do: the next step takes s = 0
    dual = opt.state[params[0]]["dual"].clone()
    set_grads(params, seed=9)
    opt.step()
    assert opt.state[params[0]]["alpha"].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(opt.state[params[0]]["dual"], dual)


# -- no-op steps -----------------------------------------------------------------------------

def test_params_without_grad_are_untouched(backend, device):
    stepped, skipped = tiny_params(device)
    opt = rmda_fused.RMDA([stepped, skipped], lam=1e-2, backend=backend)
    start = [stepped.detach().clone(), skipped.detach().clone()]
    for k in range(3):
        set_grads([stepped], seed=k)  # skipped.grad stays None
        assert opt.step(lambda: 7.0) == 7.0
    assert torch.equal(skipped.detach(), start[1])
    assert not opt.state.get(skipped)  # no state: its t did not advance
    assert not torch.equal(stepped.detach(), start[0])
    assert opt.state[stepped]["step"].item() == 3
    # no parameter with a gradient at all: the step is a no-op too
    before = snapshot(opt, [stepped, skipped])
    opt.zero_grad()
    opt.step()
    assert_unchanged(before, opt, [stepped, skipped])


def test_found_inf_step_changes_nothing(backend, device):
    """A GradScaler's skipped step (found_inf set) leaves W, V, t, A and the mask as they
    were; the same step with found_inf == 0 does change them."""
    params = tiny_params(device)
    opt = rmda_fused.RMDA(params, lam=1e-2, backend=backend)
    for k in range(2):
        set_grads(params, seed=k)
        opt.step()
    set_grads(params, seed=5)
    before = snapshot(opt, params)
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    assert_unchanged(before, opt, params)
    opt.found_inf = torch.zeros((), device=device)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 3
    assert not torch.equal(params[0].detach(), before[0][0])


@pytest.mark.parametrize("config", ["default", "c=1", "tensor lr", "maximize"])
def test_zero_grads_leave_w_in_place_while_v_is_zero_and_lam_is_zero(backend, device,
                                                                      config):
    """With lam == 0 and no gradient since the first step, z = W0 = W: W stays (up to the
    rounding of (1-c) W + c W), as torch's zero-gradient no-op test expects."""
    params = tiny_params(device)
    start = [p.detach().clone() for p in params]
    opt = rmda_fused.RMDA(params, backend=backend, **fresh(CONFIGS[config]))
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, s in zip(params, start):
        torch.testing.assert_close(p.detach(), s, rtol=1e-6, atol=0)
        assert opt.state[p]["step"].item() == 2


def test_zero_grads_after_gradients_still_move_w_towards_z(backend, device):
    """Not a no-op: V stays, t and A advance, z = W0 - V/sqrt(t) moves and W follows it."""
    c, lr = 0.5, 0.1
    (p,) = tiny_params(device, shapes=((4, 3),))
    opt = rmda_fused.RMDA([p], lr=lr, momentum=c, backend=backend)
    set_grads([p], seed=1)
    opt.step()
    state = opt.state[p]
    w0, v, w = state["initial"].clone(), state["dual"].clone(), p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(state["dual"], v)
    assert state["step"].item() == 2
    assert state["alpha"].item() == pytest.approx(lr * (1 + math.sqrt(2)), rel=1e-6)
    expected = (1 - c) * w + c * (w0 - v / math.sqrt(2))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), w)


def test_zero_grads_with_lam_shrink_w_by_design(backend, device):
    """Why torch's zero-gradient no-op test is set aside for lam > 0: the first step's
    prox shrinks z = W0 by tau = lam * lr, and W moves to (1-c) W0 + c z."""
    c, lr, lam = 0.5, 0.1, 0.5
    (p,) = tiny_params(device, shapes=((4, 3),))
    w0 = p.detach().clone()
    opt = rmda_fused.RMDA([p], lr=lr, momentum=c, lam=lam, backend=backend)
    p.grad = torch.zeros_like(p)
    opt.step()
    # input_channel groups of a (4, 3) weight are its columns, of 4 entries each
    norms = w0.norm(dim=0, keepdim=True)
    z = w0 * torch.clamp(1 - lam * lr * math.sqrt(4) / norms, min=0)
    torch.testing.assert_close(p.detach(), (1 - c) * w0 + c * z, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), w0)
