"""load_state_dict: built on torch's loading (every hook's edits survive), RMDA's dtypes kept,
and a state dict that does not fit refused before anything changes, naming the mismatch."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import rmda_fused


def stepped(dtype=torch.float32, steps=3, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(5, generator=gen).to(dtype))]
    opt = rmda_fused.RMDA(params, lr=0.1, lam=0.05, **kwargs)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return opt, params


def fresh_like(params, **kwargs):
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return rmda_fused.RMDA(copies, lr=0.1, lam=0.05, **kwargs), copies


def state_of(opt):
    return [{k: v.clone() for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"] if opt.state[p]]


def assert_same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_load_pre_hook_edits_survive():
    opt, params = stepped()
    other, _ = fresh_like(params)

    def set_step(optimizer, state_dict):  # returns a new dict, as a hook may
        state_dict = copy.deepcopy(state_dict)
        for entry in state_dict["state"].values():
            entry["step"] = torch.tensor(7.0)
        return state_dict

    other.register_load_state_dict_pre_hook(set_step)
    other.load_state_dict(opt.state_dict())
    assert all(float(other.state[p]["step"]) == 7.0 for p in other.param_groups[0]["params"])


def test_load_post_hook_edits_survive():
    opt, params = stepped()
    other, copies = fresh_like(params)

    def zero_dual(optimizer):
        for p in copies:
            optimizer.state[p]["dual"] = torch.zeros_like(optimizer.state[p]["dual"])

    other.register_load_state_dict_post_hook(zero_dual)
    other.load_state_dict(opt.state_dict())
    assert all(not other.state[p]["dual"].any() for p in copies)
    assert other.state[copies[0]]["dual"].dtype == torch.float32


@pytest.mark.parametrize("value", [3, 3.0], ids=["int", "float"])
def test_step_and_alpha_saved_as_python_numbers_load(value):
    opt, params = stepped()
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"], entry["alpha"] = value, float(value)
    other, copies = fresh_like(params)
    other.load_state_dict(saved)
    for p in copies:
        for key in ("step", "alpha"):
            t = other.state[p][key]
            assert t.dtype == torch.float32 and t.shape == () and float(t) == 3.0
    for p in copies:
        p.grad = torch.ones_like(p)
    other.step()
    assert float(other.state[copies[0]]["step"]) == 4.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state_exactly(dtype):
    opt, params = stepped(dtype)
    other, copies = fresh_like(params)
    other.load_state_dict(opt.state_dict())
    assert_same_state(state_of(opt), state_of(other))
    assert other.state[copies[0]]["zero_mask"].dtype == torch.bool


def test_loaded_state_does_not_alias_the_callers_dict():
    opt, params = stepped()
    saved = opt.state_dict()
    other, copies = fresh_like(params)
    other.load_state_dict(saved)
    assert other.state[copies[0]]["dual"].data_ptr() != saved["state"][0]["dual"].data_ptr()


def test_weights_only_save_and_load_round_trip():
    opt, params = stepped()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other, _ = fresh_like(params)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(state_of(opt), state_of(other))


def test_named_parameters_state_dict_loads():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = rmda_fused.RMDA(model.named_parameters(), lr=0.1, lam=0.05)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    other = rmda_fused.RMDA(model.named_parameters(), lr=0.1, lam=0.05)
    other.load_state_dict(saved)
    assert_same_state(state_of(opt), state_of(other))


def test_a_state_dict_from_before_the_newer_options_loads():
    opt, params = stepped()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("maximize", "skip_nonfinite", "foreach", "fused", "capturable",
                    "differentiable", "weight_decay"):
            del group[key]
    other, _ = fresh_like(params)
    other.load_state_dict(saved)
    assert other.param_groups[0]["maximize"] is False
    assert other.param_groups[0]["skip_nonfinite"] is True


def test_backend_stays_the_live_choice():
    opt, params = stepped(backend="reference")
    other, _ = fresh_like(params)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["backend"] == "auto"


def _sgd_state_dict(params):
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    return sgd.state_dict()


def _edit_state(key, value):
    def edit(saved):
        saved["state"][0][key] = value
    return edit


@pytest.mark.parametrize("spoil, match", [
    (lambda saved: saved["param_groups"].append(dict(saved["param_groups"][0])),
     "different number of parameter groups"),
    (lambda saved: saved["param_groups"][0]["params"].pop(),
     "doesn't match the size of optimizer's group"),
    (lambda saved: saved["param_groups"][0].pop("lam"), r"param group 0 .* has no 'lam'"),
    (lambda saved: saved["param_groups"][0].__setitem__("lr", -1.0),
     "param group 0: Invalid learning rate: -1.0"),
    (lambda saved: saved["param_groups"][0].__setitem__("grouping", "rows"), "'rows'"),
    (_edit_state("dual", torch.zeros(4, 3)),
     r"parameter 0 \(shape \(4, 3, 3, 3\)\): 'dual' has shape \(4, 3\)"),
    (_edit_state("initial", torch.zeros(4, 3, 3, 3, dtype=torch.int64)),
     "'initial' must be a floating-point tensor"),
    (_edit_state("alpha", "1.0"), "'alpha' must be a number or a one-element tensor"),
    (_edit_state("zero_mask", torch.zeros(5, dtype=torch.bool)),
     r"'zero_mask' must hold one entry per group of grouping 'input_channel' \(3\)"),
    (_edit_state("momentum_buffer", torch.zeros(4, 3, 3, 3)), r"unknown \['momentum_buffer'\]"),
    (lambda saved: saved["state"][1].pop("dual"), r"parameter 1 .*missing \['dual'\]"),
], ids=["groups", "params", "hyper-key", "lr", "grouping", "shape", "dtype", "alpha", "mask",
        "extra-key", "missing-key"])
def test_a_state_dict_that_does_not_fit_changes_nothing(spoil, match):
    opt, params = stepped()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state's dicts
    spoil(saved)
    before = state_of(opt), [dict(g) for g in opt.param_groups]
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(saved)
    assert_same_state(before[0], state_of(opt))
    assert [dict(g) for g in opt.param_groups] == before[1]


def test_an_sgd_state_dict_is_named_as_such():
    opt, params = stepped()
    before = state_of(opt)
    with pytest.raises(ValueError, match=r"has no 'lam', 'grouping' .*not an RMDA state dict"):
        opt.load_state_dict(_sgd_state_dict([torch.nn.Parameter(p.detach().clone())
                                             for p in params]))
    assert_same_state(before, state_of(opt))


def test_step_stays_where_it_was_saved_until_the_next_step():
    """As torch's loading keeps a non-capturable optimizer's ``step``: a CPU state dict
    loaded for parameters on another device (here "meta", which needs no GPU) leaves t on
    the CPU and the rest on the parameters' device; the next step moves t there."""
    opt, params = stepped(backend="reference")
    meta = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
    other = rmda_fused.RMDA(meta, lr=0.1, lam=0.05, backend="reference")
    other.load_state_dict(opt.state_dict())
    for p in meta:
        assert other.state[p]["step"].device.type == "cpu"
        assert other.state[p]["dual"].device.type == "meta"
        p.grad = torch.empty_like(p)
    other.step()
    assert all(other.state[p]["step"].device.type == "meta" for p in meta)
