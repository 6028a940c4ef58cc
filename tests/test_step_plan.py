"""The optimizer's step plans (rmda_fused/_step_plan.py): reused while the gradients keep
their layout, rebuilt whenever what they were built from changes, and never a different
update from a freshly built step."""
from __future__ import annotations

import copy

import pytest
import torch

import rmda_fused
from helpers import assert_unchanged, snapshot


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                               torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5))


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _optimizer(model, backend="reference"):
    return rmda_fused.RMDA(model.parameters(), lr=0.1, lam=1e-2, backend=backend)


def test_plan_is_reused_while_gradients_keep_their_layout(fast_backend):
    model = _model()
    opt = _optimizer(model, fast_backend)
    _grads(model, 1)
    opt.step()
    plan = opt._plans[0]
    for seed in range(2, 5):  # new gradient tensors each step, as zero_grad(set_to_none)
        _grads(model, seed)
        opt.step()
        assert opt._plans[0] is plan


def _replay(changes, backend):
    """Steps with ``changes[k](model, opt)`` applied before step k, next to the same steps
    on an optimizer rebuilt from a copy of the state before every step (no plan reused)."""
    model, fresh_model = _model(), _model()
    opt = _optimizer(model, backend)
    for k, change in enumerate(changes):
        _grads(model, 10 + k)
        change(model, opt)
        fresh_model.load_state_dict(model.state_dict())
        for p, q in zip(fresh_model.parameters(), model.parameters()):
            q_grad = q.grad
            p.grad = None if q_grad is None else q_grad.clone()
        fresh = _optimizer(fresh_model, backend)
        saved = copy.deepcopy(opt.state_dict())
        for entry in saved["state"].values():  # written by the step, never read: a regrouped
            entry.pop("zero_mask", None)        # state's old mask would not load
        fresh.load_state_dict(saved)
        opt.step()
        fresh.step()
        for p, q in zip(model.parameters(), fresh_model.parameters()):
            assert torch.equal(p, q)
    return opt


def _drop_fc_grad(model, opt):
    model[3].weight.grad = None


def _channels_last_grad(model, opt):
    conv = model[0].weight
    conv.grad = conv.grad.contiguous(memory_format=torch.channels_last)


def _regroup(model, opt):
    opt.param_groups[0]["grouping"] = "output_channel"


def _nothing(model, opt):
    pass


@pytest.mark.filterwarnings("ignore:rmda_fused. backend:RuntimeWarning")  # the fallback's
@pytest.mark.parametrize("change", [_drop_fc_grad, _channels_last_grad, _regroup])
def test_a_changed_step_gets_a_new_plan_and_the_same_update(change, fast_backend):
    _replay([_nothing, _nothing, change, _nothing, change, _nothing], fast_backend)


def test_load_state_dict_drops_the_plans(fast_backend):
    model = _model()
    opt = _optimizer(model, fast_backend)
    _grads(model, 1)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.step()
    opt.load_state_dict(saved)
    assert not opt._plans
    before = [opt.state[p]["step"].item() for p in model.parameters()]
    opt.step()
    assert [opt.state[p]["step"].item() for p in model.parameters()] == [t + 1 for t in before]


def test_a_sparse_gradient_after_a_planned_step_is_refused_by_name(fast_backend):
    model = _model()
    opt = _optimizer(model, fast_backend)
    _grads(model, 1)
    opt.step()
    fc = model[3].weight
    fc.grad = fc.grad.to_sparse()
    before = snapshot(opt, list(model.parameters()))
    with pytest.raises(TypeError, match="sparse gradients.*parameter 4"):
        opt.step()
    assert_unchanged(before, opt, list(model.parameters()))


def _swap_in_place(model, opt):
    """A parameter of the group replaced by another in place, as a pruning tool might."""
    group = opt.param_groups[0]
    old = group["params"][0]
    new = torch.nn.Parameter(old.detach().clone())
    new.grad = old.grad.clone()
    group["params"][0] = new


def test_a_parameter_replaced_in_place_gets_a_new_plan(fast_backend):
    model = _model()
    opt = _optimizer(model, fast_backend)
    _grads(model, 1)
    opt.step()
    _swap_in_place(model, opt)
    new = opt.param_groups[0]["params"][0]
    opt.step()
    assert opt.state[new]["step"].item() == 1  # stepped, with state of its own


def test_a_one_element_parameter_replaced_by_an_equal_one_is_not_taken_for_it(fast_backend):
    """A list compare takes two equal one-element tensors for equal: the plan must not."""
    scalar = torch.nn.Parameter(torch.ones(()))
    scalar.grad = torch.ones(())
    opt = rmda_fused.RMDA([scalar], lr=0.1, backend=fast_backend)
    opt.step()
    twin = torch.nn.Parameter(scalar.detach().clone())  # equal to it: == says True
    twin.grad = torch.ones(())
    opt.param_groups[0]["params"][0] = twin
    before = twin.detach().clone()
    opt.step()
    assert opt.state[twin]["step"].item() == 1 and opt.state[scalar]["step"].item() == 1
    assert not torch.equal(twin, before)


def test_planned_and_listed_replays_make_the_same_steps(monkeypatch, fast_backend):
    """The extension's replay (csrc/step_plan.cpp) against the Python one, bit for bit,
    over steps whose gradients come and go."""
    from rmda_fused import _step_plan

    def run(listed):
        if listed:
            monkeypatch.setattr(_step_plan, "grad_watch",
                                lambda params, listed: _step_plan.ListedGrads(params))
        model = _model()
        opt = _optimizer(model, fast_backend)
        for k in range(6):
            _grads(model, k)
            if k % 3 == 2:
                model[3].weight.grad = None
            opt.step()
        monkeypatch.undo()
        return opt, [p.detach().clone() for p in model.parameters()]

    planned, planned_params = run(listed=False)
    listed, listed_params = run(listed=True)
    assert all(isinstance(p.watch, _step_plan.ListedGrads) for p in listed._plans.values())
    for p, q in zip(planned_params, listed_params):
        assert torch.equal(p, q)
    if fast_backend == "cpu":  # the C++ backend's routes are planned steps
        assert all(plan.native for plan in planned._plans.values())
        assert all(route[-1] is not None for plan in planned._plans.values()
                   for route in plan.routes)


def test_a_planned_step_keeps_no_gradient_alive(fast_backend):
    import weakref

    model = _model()
    opt = _optimizer(model, fast_backend)
    _grads(model, 1)
    opt.step()
    _grads(model, 2)
    opt.step()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    assert all(ref() is None for ref in refs)
