"""RMDA as a torch.optim drop-in: torch's switches, maximize, the c > 0.5 warning, non-finite
gradients without a GradScaler, and refused steps that change nothing."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import assert_unchanged, compare, snapshot


def small_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4, 3, 3), (5, 3, 1, 1), (10, 7), (6,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype) * 0.5)
            for s in shapes]


def grads_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


# -- torch.optim's switches ----------------------------------------------------------------

@pytest.mark.parametrize("switch", ["foreach", "fused", "capturable", "differentiable"])
def test_torch_switches_accepted_when_off(switch):
    for off in (False, None):
        opt = rmda_fused.RMDA(small_params(), **{switch: off})
        assert opt.param_groups[0][switch] is off


@pytest.mark.parametrize("switch, names", [
    ("foreach", "backend='reference'"), ("fused", "backend='cpu', 'cuda' or 'triton'"),
    ("capturable", "captured in a CUDA graph as it is"), ("differentiable", "no backend"),
])
def test_torch_switches_refused_when_on_name_the_backend_option(switch, names):
    with pytest.raises(ValueError, match=f"{switch}=True is not supported: .*{names}"):
        rmda_fused.RMDA(small_params(), **{switch: True})


def test_generic_trainer_keywords_build_rmda():
    # what optimizer factories pass (Hugging Face, timm): weight_decay=0 and foreach=False
    opt = rmda_fused.RMDA(small_params(), lr=0.1, lam=1e-3, weight_decay=0.0, foreach=False)
    assert opt.defaults["weight_decay"] == 0.0


# -- maximize --------------------------------------------------------------------------------

def test_maximize_is_minimizing_the_negated_gradient(backend, device):
    """Bit-identical in every backend, with and without a GradScaler's scale."""
    for scale in (None, 1024.0):
        ups = [p.detach().to(device).requires_grad_() for p in small_params()]
        downs = [p.detach().clone().requires_grad_() for p in ups]
        up = rmda_fused.RMDA(ups, lr=0.05, lam=0.5, backend=backend, maximize=True)
        down = rmda_fused.RMDA(downs, lr=0.05, lam=0.5, backend=backend)
        for k in range(4):
            for a, b, g in zip(ups, downs, grads_for(ups, k)):
                a.grad, b.grad = g.to(device), -g.to(device)
            for opt in (up, down):
                if scale is not None:
                    opt.grad_scale = torch.tensor(scale, device=device)
                    for p in opt.param_groups[0]["params"]:
                        p.grad.mul_(scale)
                opt.step()
        for a, b in zip(ups, downs):
            assert torch.equal(a, b)
            for key in ("dual", "step", "alpha"):
                assert torch.equal(up.state[a][key], down.state[b][key])


def test_maximize_against_float64_reference(fast_backend):
    params = small_params()
    opt = rmda_fused.RMDA(params, lr=0.05, lam=0.3, backend=fast_backend, maximize=True)
    ref = Float64RMDA([dict(params=params, lr=0.05, momentum=0.1, lam=0.3,
                            grouping="input_channel")])
    for k in range(30):
        grads = grads_for(params, k)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([-g for g in grads])
    compare(opt, params, ref)


def test_maximize_goes_uphill():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = rmda_fused.RMDA([w], lr=0.1, maximize=True)
    for _ in range(20):
        opt.zero_grad()
        (-(w - 1.0).pow(2).sum()).backward()  # maximum at w = 1
        opt.step()
    assert (w - 1.0).abs().max() < 0.5


# -- the c > 0.5 warning -----------------------------------------------------------------------

def test_momentum_typed_from_sgd_warns_once():
    with pytest.warns(UserWarning, match=r"c=0.9 > 0.5: SGD's momentum") as record:
        opt = rmda_fused.RMDA(small_params(), momentum=0.9)
    assert record[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group(dict(params=small_params(seed=1), momentum=0.95))
        for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1),
], ids=["OneCycleLR", "CyclicLR"])
def test_cycle_momentum_schedulers_are_named(make):
    params = small_params()
    opt = rmda_fused.RMDA(params, lr=0.1)
    sched = make(opt)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="cycle_momentum=False"):
        opt.step()
    sched.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_restart_schedule_raising_c_does_not_warn():
    params = small_params()
    opt = rmda_fused.RMDA(params, lr=0.1, momentum=0.1)
    sched = rmda_fused.MultiStepRestart(opt, milestones=[1, 2], gamma=0.1,
                                        momentum_schedule="iclr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            sched.step()
    assert opt.param_groups[0]["momentum"] == 1.0


# -- non-finite gradients without a GradScaler ----------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_skips_the_whole_step(backend, device, bad):
    params = [p.detach().to(device).requires_grad_() for p in small_params()]
    opt = rmda_fused.RMDA([dict(params=params[:2]), dict(params=params[2:], lam=0.0)],
                          lr=0.1, lam=0.5, backend=backend)
    for k in range(2):  # some history first
        for p, g in zip(params, grads_for(params, k)):
            p.grad = g.to(device)
        opt.step()
    before = snapshot(opt, params)
    for p, g in zip(params, grads_for(params, 5)):
        p.grad = g.to(device)
    params[3].grad[1] = bad  # one entry of a bias in the other param group
    opt.step()
    assert_unchanged(before, opt, params)
    params[3].grad.zero_()  # the next finite step goes on from the same state
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 3.0
    assert all(torch.isfinite(opt.state[p]["dual"]).all() for p in params)


def test_skip_nonfinite_false_lets_the_gradient_through():
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = rmda_fused.RMDA([p], lr=0.1, skip_nonfinite=False)
    p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert torch.isnan(opt.state[p]["dual"]).all()


def test_grad_scaler_found_inf_is_used_without_a_second_check(monkeypatch):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = rmda_fused.RMDA([p], lr=0.1)
    calls = []
    monkeypatch.setattr(rmda_fused.functional, "nonfinite_flag",
                        lambda grads: calls.append(grads))
    p.grad = torch.ones_like(p)
    opt.found_inf, opt.grad_scale = torch.zeros(()), torch.ones(())
    opt.step()
    assert calls == [] and float(opt.state[p]["step"]) == 1.0


# -- refused calls change nothing --------------------------------------------------------------

def _stepped_optimizer(backend="cpu" if "cpu" in rmda_fused.available_backends() else "reference"):
    params = small_params()
    opt = rmda_fused.RMDA([dict(params=params[:2]), dict(params=params[2:])], lr=0.1, lam=0.5,
                          backend=backend)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    return opt, params


@pytest.mark.parametrize("spoil", [
    lambda opt, ps: setattr(ps[2], "grad", torch.ones(10, 7).to_sparse()),
    lambda opt, ps: opt.param_groups[1].__setitem__("lr", -1.0),
    lambda opt, ps: opt.param_groups[1].__setitem__("lam", math.nan),
    lambda opt, ps: opt.param_groups[1].__setitem__("momentum", 0.0),
    lambda opt, ps: opt.param_groups[1].__setitem__("grouping", "rows"),
    lambda opt, ps: opt.param_groups[1].__setitem__("maximize", None),
    lambda opt, ps: opt.param_groups[1].__setitem__("backend", "cuda"),
], ids=["sparse-grad", "lr", "lam", "momentum", "grouping", "maximize", "backend"])
def test_refused_step_changes_nothing(spoil):
    opt, params = _stepped_optimizer()
    new = torch.nn.Parameter(torch.randn(3, 2, 3, 3))  # steps for the first time now
    opt.add_param_group(dict(params=[new]))
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    new.grad = torch.ones_like(new)
    before = snapshot(opt, params + [new])
    spoil(opt, params)
    if opt.param_groups[1]["backend"] == "cuda" and torch.cuda.is_available():
        pytest.skip("the 'cuda' backend runs here")
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        opt.step()
    assert_unchanged(before, opt, params + [new])
    assert new not in opt.state or not opt.state[new]


def test_refused_add_param_group_changes_nothing():
    opt, params = _stepped_optimizer()
    groups = copy.deepcopy(opt.param_groups[0]["lr"]), len(opt.param_groups)
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.ones(2, 2))], lr=math.inf))
    assert (opt.param_groups[0]["lr"], len(opt.param_groups)) == groups



# -- torch.compile -----------------------------------------------------------------------------

def _tiny_model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    return model


def _graph_breaks(opt):
    torch._dynamo.reset()
    return torch._dynamo.explain(opt.step)().graph_break_count


def test_compiled_step_breaks_no_more_than_sgd(fast_backend):
    """With a tensor lr, as torch's docs advise for compiled optimizers; resolving the
    backend is a dict lookup, so the whole step is one graph."""
    model = _tiny_model_with_grads()
    sgd = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.01), momentum=0.9,
                          foreach=False)
    rmda = rmda_fused.RMDA(model.parameters(), lr=torch.tensor(0.01), lam=1e-3,
                           backend=fast_backend)
    assert _graph_breaks(rmda) <= _graph_breaks(sgd)


def test_compiled_step_matches_eager(fast_backend):
    eager_model, compiled_model = _tiny_model_with_grads(), _tiny_model_with_grads()
    eager = rmda_fused.RMDA(eager_model.parameters(), lr=torch.tensor(0.05), lam=0.1,
                            backend=fast_backend)
    compiled = rmda_fused.RMDA(compiled_model.parameters(), lr=torch.tensor(0.05), lam=0.1,
                               backend=fast_backend)
    torch._dynamo.reset()
    step = torch.compile(compiled.step, backend="eager", fullgraph=True)
    for _ in range(3):
        eager.step()
        step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)


def test_one_element_amp_scalars_of_shape_1_work_like_0d(fast_backend):
    results = []
    for shape in ((), (1,)):
        p = torch.nn.Parameter(torch.ones(4, 3))
        opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1, backend=fast_backend)
        p.grad = torch.full_like(p, 8.0)
        opt.grad_scale = torch.full(shape, 8.0)
        opt.found_inf = torch.zeros(shape)
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)
