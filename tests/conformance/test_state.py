"""RMDA's state_dict, hooks, copies and printing behave like a torch.optim optimizer's, on
every backend (the properties PyTorch's generic optimizer suite checks)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import (
    register_optimizer_step_post_hook, register_optimizer_step_pre_hook,
)

import rmda_fused
from conformance_testing import (
    CONFORMANCE_MARKS, NEWER_OPTIONS, assert_same, fresh, set_grads, tiny_params,
)
from helpers import assert_unchanged, snapshot

pytestmark = CONFORMANCE_MARKS


# -- state_dict ------------------------------------------------------------------------------

def primed(backend, device, steps=3, named=False, **kwargs):
    params = tiny_params(device)
    given = [(f"p{i}", p) for i, p in enumerate(params)] if named else params
    opt = rmda_fused.RMDA(given, backend=backend, **{"lam": 1e-2, **kwargs})
    for k in range(steps):
        set_grads(params, seed=k)
        opt.step()
    return opt, params


def twin_of(opt, params, named=False, **kwargs):
    copies = [Parameter(p.detach().clone()) for p in params]
    given = [(f"p{i}", p) for i, p in enumerate(copies)] if named else copies
    return rmda_fused.RMDA(given, backend=opt.param_groups[0]["backend"],
                           **{"lam": 1e-2, **kwargs}), copies


def step_both(pairs, seeds):
    for k in seeds:
        for opt, params in pairs:
            set_grads(params, seed=k)
            opt.step()


def assert_twins_step_alike(opt, params, twin, copies, seeds):
    """Both optimizers take the same steps; their parameters stay bit-identical."""
    step_both([(opt, params), (twin, copies)], seeds=seeds)
    for p, q in zip(params, copies):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1)], ids=["float lr", "tensor lr"])
def test_state_dict_round_trip_is_deterministic(backend, device, lr):
    opt, params = primed(backend, device, lr=fresh({"lr": lr})["lr"])
    saved = copy.deepcopy(opt.state_dict())
    given = copy.deepcopy(saved)
    twin, copies = twin_of(opt, params, lr=fresh({"lr": lr})["lr"])
    twin.load_state_dict(given)
    assert_same(given, saved)  # loading does not change the caller's dict
    assert_same(twin.state_dict(), opt.state_dict())  # loaded == original
    for i, q in enumerate(copies):  # the twin's state is its own, not the dict's tensors
        assert twin.state[q]["dual"].data_ptr() != given["state"][i]["dual"].data_ptr()
    assert_twins_step_alike(opt, params, twin, copies, seeds=range(10, 13))
    assert_same(twin.state_dict(), opt.state_dict())


def test_weights_only_save_and_load(backend, device):
    opt, params = primed(backend, device, lr=torch.tensor(0.1))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(loaded, opt.state_dict())
    twin, copies = twin_of(opt, params)
    twin.load_state_dict(loaded)
    assert_twins_step_alike(opt, params, twin, copies, seeds=[20])


def test_older_state_dict_without_the_newer_options_loads(backend, device):
    opt, params = primed(backend, device)
    older = copy.deepcopy(opt.state_dict())
    for group in older["param_groups"]:
        for key in NEWER_OPTIONS:
            del group[key]
    twin, copies = twin_of(opt, params)
    twin.load_state_dict(older)
    for key in NEWER_OPTIONS:  # each takes its default again
        assert twin.param_groups[0][key] == opt.param_groups[0][key], key
    assert_twins_step_alike(opt, params, twin, copies, seeds=[30])


@pytest.mark.parametrize("named_from", [False, True], ids=["from plain", "from named"])
@pytest.mark.parametrize("named_to", [False, True], ids=["to plain", "to named"])
def test_named_and_plain_state_dicts_load_into_each_other(backend, device, named_from,
                                                          named_to):
    opt, params = primed(backend, device, named=named_from)
    twin, copies = twin_of(opt, params, named=named_to)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    if named_from or named_to:
        assert twin.state_dict()["param_groups"][0]["param_names"] == ["p0", "p1"]
    assert_twins_step_alike(opt, params, twin, copies, seeds=[40])


def test_step_saved_as_a_python_number_loads(backend, device):
    opt, params = primed(backend, device)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"] = entry["step"].item()
        entry["alpha"] = entry["alpha"].item()
    twin, copies = twin_of(opt, params)
    twin.load_state_dict(saved)
    for q in copies:
        for key in ("step", "alpha"):
            value = twin.state[q][key]
            assert isinstance(value, torch.Tensor) and value.shape == ()
            assert value.dtype == torch.float32 and value.device == q.device
    step_both([(opt, params), (twin, copies)], seeds=[50])
    for p, q in zip(params, copies):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_every_stepped_param_has_its_state(backend, device):
    params = tiny_params(device)
    opt = rmda_fused.RMDA(params, lam=1e-2, backend=backend)
    set_grads(params, seed=0)
    opt.step()
    assert set(opt.state[params[0]]) == {"initial", "dual", "step", "alpha", "zero_mask"}
    assert set(opt.state[params[1]]) == {"initial", "dual", "step", "alpha"}  # 1-D: no groups


# -- hooks -----------------------------------------------------------------------------------

def test_step_hooks_run_around_the_step_in_torchs_order(backend, device):
    params = tiny_params(device)
    opt = rmda_fused.RMDA(params, backend=backend)
    calls = []

    def hook(name):
        def record(optimizer, args, kwargs):
            assert optimizer is opt or name.startswith("global")
            t = opt.state[params[0]]["step"].item() if opt.state.get(params[0]) else 0
            calls.append((name, t))
        return record

    handles = [register_optimizer_step_pre_hook(hook("global pre")),
               register_optimizer_step_post_hook(hook("global post")),
               opt.register_step_pre_hook(hook("pre")),
               opt.register_step_post_hook(hook("post"))]
    try:
        set_grads(params, seed=0)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    # pre hooks see the state before the step (t = 0), post hooks after it (t = 1)
    assert calls == [("global pre", 0), ("pre", 0), ("post", 1), ("global post", 1)]
    opt.step()
    assert len(calls) == 4  # removed hooks do not run


def test_state_dict_hooks(backend, device):
    opt, _ = primed(backend, device, steps=1)

    def pre(optimizer):
        optimizer.state["note"] = "from the pre hook"

    def post(optimizer, state_dict):
        state_dict["seen_note"] = state_dict["state"].pop("note", None)
        return state_dict

    pre_handle = opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["note"] == "from the pre hook"
    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert saved["seen_note"] == "from the pre hook" and "note" not in saved["state"]
    pre_handle.remove()
    del opt.state["note"]
    assert opt.state_dict()["seen_note"] is None


def test_load_state_dict_hooks(backend, device):
    opt, params = primed(backend, device, steps=2)
    saved = opt.state_dict()
    twin, copies = twin_of(opt, params)
    seen = {}

    def set_lr(value):
        def hook(optimizer, state_dict):
            state_dict["param_groups"][0]["lr"] = value
        return hook

    def replace(optimizer, state_dict):  # a pre hook may return a new dict
        new = copy.deepcopy(state_dict)
        new["param_groups"][0]["momentum"] = 0.3
        return new

    def post(optimizer):
        # RMDA's own post hook ran first: the state is in place, as tensors
        seen["step"] = optimizer.state[copies[0]]["step"]
        seen["lr"] = optimizer.param_groups[0]["lr"]

    twin.register_load_state_dict_pre_hook(set_lr(0.02))
    twin.register_load_state_dict_pre_hook(set_lr(0.03), prepend=True)  # runs first
    twin.register_load_state_dict_pre_hook(replace)
    twin.register_load_state_dict_post_hook(post)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == 0.02 and seen["lr"] == 0.02
    assert twin.param_groups[0]["momentum"] == 0.3
    assert isinstance(seen["step"], torch.Tensor) and seen["step"].item() == 2


# -- copying and printing --------------------------------------------------------------------

def test_deepcopy_is_a_whole_independent_optimizer(backend, device):
    opt, params = primed(backend, device)
    clone = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(clone) if not k.startswith("_")}
    clone_params = clone.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(params, clone_params))
    before = snapshot(opt, params)
    step_both([(clone, clone_params)], seeds=[60])  # stepping the copy...
    assert_unchanged(before, opt, params)  # ...leaves the original as it was
    step_both([(opt, params)], seeds=[60])
    for p, q in zip(params, clone_params):
        assert torch.equal(p.detach(), q.detach())


def test_repr_lists_every_group_and_option(backend, device):
    weight, bias = tiny_params(device)
    opt = rmda_fused.RMDA([{"params": [weight], "lam": 0.01},
                           {"params": [bias], "grouping": "none"}], backend=backend)
    text = repr(opt)
    assert text.startswith("RMDA (")
    for line in ("Parameter Group 0", "Parameter Group 1", "lam: 0.01", "lam: 0.0",
                 "grouping: input_channel", "grouping: none", "momentum: 0.1", "lr: 0.1",
                 f"backend: {backend}", "maximize: False"):
        assert f"\n    {line}\n" in text or f"\n{line}\n" in text, line
