"""Every invalid input is rejected with an error that names the offending value or parameter."""
from __future__ import annotations

import re
import types
import warnings

import pytest
import torch

import rmda_fused
from rmda_fused import functional


def weight(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr="0.1"), "Invalid learning rate: '0.1'"),
    (dict(lam=-0.5), "Invalid lam value: -0.5"),
    (dict(momentum=0), "Invalid momentum value: 0"),
    (dict(momentum=0.0), "Invalid momentum value: 0.0"),
    (dict(momentum=1.5), "Invalid momentum value: 1.5"),
    (dict(momentum=-0.1), "Invalid momentum value: -0.1"),
    (dict(momentum=0.9 + 1), "Invalid momentum value: 1.9"),
    (dict(grouping="rows"), "grouping 'rows'"),
    (dict(grouping=None), "grouping None"),
    (dict(weight_decay=1e-4), "Invalid weight_decay value: 0.0001"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (dict(lr=float("inf")), "Invalid learning rate: inf"),
    (dict(lr=1e400), "Invalid learning rate: inf"),
    (dict(lam=float("inf")), "Invalid lam value: inf"),
    (dict(lam=float("nan")), "Invalid lam value: nan"),
    (dict(backend="nope"), "backend 'nope'"),
    (dict(lr=torch.ones(2)), r"Tensor lr must be 1-element, got shape \(2,\)"),
])
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rmda_fused.RMDA([weight(6, 4, 3, 3)], **kwargs)


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="nesterov"):
        rmda_fused.RMDA([weight(4, 3)], nesterov=True)


@pytest.mark.parametrize("momentum", [1, 1.0, 0.5, 1e-6])
def test_valid_momentum_accepted(momentum):
    p = weight(4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = rmda_fused.RMDA([p], momentum=momentum, lr=0.0, lam=0.0)
    assert len(record) == (momentum > 0.5)  # c > 0.5 is accepted, with a warning
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.param_groups[0]["momentum"] == momentum


def test_lr_zero_and_lam_zero_accepted():
    rmda_fused.RMDA([weight(4, 3)], lr=0.0, lam=0.0)
    rmda_fused.RMDA([weight(4, 3)], lr=torch.tensor(0.1))


@pytest.mark.parametrize("weight_decay", [0, 0.0])
def test_weight_decay_zero_is_accepted(weight_decay):
    """Optimizer factories (Hugging Face Trainer, timm) always pass weight_decay."""
    p = weight(4, 3)
    opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1, weight_decay=weight_decay)
    opt.add_param_group(dict(params=[weight(5, 3)], weight_decay=0.0))
    p.grad = torch.randn_like(p)
    opt.step()


def test_tensor_lr_must_be_finite():
    with pytest.raises(ValueError, match="Invalid learning rate: "):
        rmda_fused.RMDA([weight(4, 3)], lr=torch.tensor(float("inf")))


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
@pytest.mark.parametrize("shape", [(6,), ()])
def test_channel_grouping_leaves_tensors_under_two_dims_unregularized(grouping, shape, fast_backend):
    """RMDA(model.parameters(), lam=...) works: a bias or a norm's weight has no channel,
    takes the dual-averaging update (the same as grouping 'none') and has no zero mask."""
    w, b = weight(6, 4), torch.nn.Parameter(torch.randn(shape))
    b_plain = torch.nn.Parameter(b.detach().clone())
    opt = rmda_fused.RMDA([w, b], lr=0.1, lam=0.5, grouping=grouping, backend=fast_backend)
    plain = rmda_fused.RMDA([b_plain], lr=0.1, grouping="none", backend=fast_backend)
    for k in range(3):
        g = torch.full(shape, 0.3 * (k + 1))
        w.grad, b.grad, b_plain.grad = torch.randn_like(w), g, g.clone()
        opt.step()
        plain.step()
    assert torch.equal(b, b_plain)
    assert "zero_mask" not in opt.state[b] and "zero_mask" in opt.state[w]
    report = rmda_fused.structure.group_sparsity(opt)
    assert [t.shape for t in report.tensors] == [(6, 4)]
    assert torch.equal(opt.prox_point(b), plain.prox_point(b_plain))  # z without a prox


def test_model_parameters_work_with_a_default_rmda():
    """The first line an SGD user writes, on a model with biases and a norm layer."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    opt = rmda_fused.RMDA(model.parameters(), lr=0.1, lam=1e-4)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    masks = [p for p in model.parameters() if "zero_mask" in opt.state[p]]
    assert [tuple(p.shape) for p in masks] == [(4, 3, 3, 3), (2, 64)]


def test_sparse_gradient_is_a_type_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = rmda_fused.RMDA(emb.parameters(), lr=0.1, lam=0.1)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(TypeError, match=r"sparse.*\(10, 3\)"):
        opt.step()


def test_complex_parameter_is_a_type_error():
    with pytest.raises(TypeError, match=r"complex.*\(4, 3\)"):
        rmda_fused.RMDA([weight(4, 3, dtype=torch.complex64)])


def test_complex_gradient_is_a_type_error():
    # a complex param with a complex grad slipped in after construction still cannot step
    opt = rmda_fused.RMDA([weight(4, 3)])
    c = weight(4, 3, dtype=torch.complex64)
    c.grad = torch.randn_like(c)
    opt.param_groups[0]["params"].append(c)
    with pytest.raises(TypeError, match=r"complex.*\(4, 3\)"):
        opt.step()


def test_integer_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="torch.int64"):
        rmda_fused.RMDA([torch.zeros(4, 3, dtype=torch.int64)])


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="'nope'"):
        rmda_fused.RMDA([weight(4, 3)], backend="nope")
    with pytest.raises(ValueError, match="'nope'"):
        functional.resolve_backend("nope", torch.device("cpu"))


def test_available_backends_reports_reasons():
    backends = rmda_fused.available_backends()
    assert backends.get("reference", "missing") is None  # the pure-torch backend works everywhere
    for name, reason in backends.items():
        assert reason is None or (isinstance(reason, str) and reason), (name, reason)


def test_unavailable_backend_raises_runtime_error_with_reason():
    unavailable = {n: r for n, r in rmda_fused.available_backends().items() if r is not None}
    if not unavailable:
        pytest.skip(f"every known backend is available here: {list(rmda_fused.available_backends())}")
    name, reason = next(iter(unavailable.items()))
    p = weight(4, 3)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        opt = rmda_fused.RMDA([p], backend=name)
        p.grad = torch.randn_like(p)
        opt.step()


def _clear_backend_caches():
    for cached in (functional._unavailable, functional._resolve_auto):
        cached.cache_clear()
    functional._RESOLVED.clear()


def test_broken_backend_reports_its_failure(monkeypatch):
    """The mechanism behind the previous test, on a backend whose probe fails anywhere."""
    def probe():
        raise ImportError("no module named _no_such_backend_module")

    broken = types.SimpleNamespace(unavailable_reason=probe, handles=lambda device: True)
    monkeypatch.setitem(functional._BACKENDS, "broken", broken)
    _clear_backend_caches()
    try:
        reason = rmda_fused.available_backends()["broken"]
        assert reason and "_no_such_backend_module" in reason
        p = weight(4, 3)
        with pytest.raises(RuntimeError, match=r"'broken'.*" + re.escape(reason)):
            opt = rmda_fused.RMDA([p], backend="broken")
            p.grad = torch.randn_like(p)
            opt.step()
    finally:
        monkeypatch.undo()
        _clear_backend_caches()


@pytest.mark.parametrize("group, error, match", [
    (dict(lr=-1.0), ValueError, r"param group 1: Invalid learning rate: -1.0"),
    (dict(momentum=0.0), ValueError, r"param group 1: Invalid momentum value: 0.0"),
    (dict(momentum=2.0), ValueError, r"param group 1: Invalid momentum value: 2.0"),
    (dict(lam=-0.1), ValueError, r"param group 1: Invalid lam value: -0.1"),
    (dict(grouping="filters"), ValueError, "'filters'"),
    (dict(backend="nope"), ValueError, "'nope'"),
    (dict(weight_decay=5e-4), ValueError, "Invalid weight_decay value: 0.0005"),
])
def test_add_param_group_rejects(group, error, match):
    opt = rmda_fused.RMDA([weight(4, 3)])
    with pytest.raises(error, match=match):
        opt.add_param_group(dict(params=[weight(5, 3)], **group))


@pytest.mark.parametrize("param, grouping, error, match", [
    (lambda: weight(4, 3, dtype=torch.complex64), "input_channel", TypeError, r"complex.*param group 1"),
    (lambda: torch.zeros(4, 3, dtype=torch.int32), "input_channel", TypeError, "torch.int32"),
])
def test_add_param_group_rejects_params(param, grouping, error, match):
    opt = rmda_fused.RMDA([weight(4, 3)])
    with pytest.raises(error, match=match):
        opt.add_param_group(dict(params=[param()], grouping=grouping))


def test_refused_param_group_leaves_the_optimizer_usable():
    p, q = weight(4, 3), weight(5, 3)
    opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.add_param_group(dict(params=[q], lr=-1.0))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[q], lr=0.2))  # the same parameter can be added again
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    assert float(opt.state[q]["step"]) == 1.0


@pytest.mark.parametrize("key, value, match", [
    ("lr", -0.5, "Invalid learning rate: -0.5"),
    ("momentum", 0.9 + 0.2, "Invalid momentum value: 1.1"),
    ("lam", -1.0, "Invalid lam value: -1.0"),
    ("grouping", "rows", "'rows'"),
])
def test_invalid_values_set_after_construction_fail_at_step(key, value, match):
    p = weight(4, 3)
    opt = rmda_fused.RMDA([p])
    opt.param_groups[0][key] = value
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"param group 0.*" + match if key != "grouping" else match):
        opt.step()
    assert p not in opt.state or float(opt.state[p]["step"]) == 0


def test_functional_rejects_misaligned_lists():
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one entry per parameter"):
        functional.rmda_step([p], [], [p.clone()], [torch.zeros(4, 3)], [torch.zeros(())],
                             [torch.zeros(())], [torch.zeros(3, dtype=torch.bool)],
                             lr=0.1, momentum=0.1, lam=0.1, grouping="input_channel")


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel", "elementwise"])
def test_non_finite_group_is_never_recorded_as_zero(grouping, backend, device):
    """A group whose norm is NaN is not "exactly zero", whatever the threshold (every
    backend; with lam this large every finite group of z is zero). The optimizer would skip
    this step (skip_nonfinite): the kernels' own rule is tested with the check off."""
    p = torch.nn.Parameter(torch.zeros(4, 3, device=device))
    opt = rmda_fused.RMDA([p], lr=0.1, lam=1e6, grouping=grouping, backend=backend,
                          skip_nonfinite=False)
    g = torch.zeros(4, 3)
    g[0, 1] = float("nan")
    p.grad = g.to(device)
    opt.step()
    mask = opt.state[p]["zero_mask"].cpu()
    if grouping == "elementwise":
        nan_group = 1  # entry (0, 1) in flat order
    else:
        nan_group = 1 if grouping == "input_channel" else 0
    assert not bool(mask[nan_group]), mask
    assert int(mask.sum()) == mask.numel() - 1, mask
    z = opt.prox_point(p)
    assert not bool(rmda_fused.grouping.group_prox_(z.clone(), 1e6, grouping)[nan_group])


@pytest.mark.parametrize("bad", [
    lambda: torch.randn(4, 3),
    lambda: torch.randn(1),                                    # would broadcast
    lambda: torch.randn(3, 4, dtype=torch.float64),
])
def test_a_gradient_that_does_not_fit_is_refused_before_anything_changes(bad, fast_backend):
    """torch's .grad setter already refuses these; the functional step, whose lists a
    caller builds, names them before writing anything."""
    q, p = torch.randn(5, 2), torch.randn(3, 4)
    state = [(x.clone(), torch.zeros_like(x), torch.zeros(()), torch.zeros(()),
              torch.zeros(x.shape[1], dtype=torch.bool)) for x in (q, p)]
    before = [x.clone() for x in (q, p)] + [t.clone() for s in state for t in s]
    with pytest.raises((ValueError, TypeError), match=r"parameter 1 \(shape \(3, 4\)\)"):
        functional.rmda_step([q, p], [torch.randn(5, 2), bad()], *map(list, zip(*state)),
                             lr=0.1, momentum=0.1, lam=0.1, grouping="input_channel",
                             backend=fast_backend)
    after = [q, p] + [t for s in state for t in s]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("key, value, match", [
    ("dual", torch.zeros(4, 4), r"parameter 0 \(shape \(4, 3\)\): 'dual' has shape \(4, 4\)"),
    ("initial", torch.zeros(3), r"parameter 0 \(shape \(4, 3\)\): 'initial' has shape \(3,\)"),
    ("step", torch.zeros(2), r"'step' must be one real number, got a torch.float32 tensor of "
                             r"shape \(2,\)"),
])
def test_load_state_dict_refuses_state_of_another_shape(key, value, match):
    """The step checks only gradients; state of the wrong shape stops at loading, before
    anything is loaded."""
    p = weight(4, 3)
    opt = rmda_fused.RMDA([p], lr=0.1, lam=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0][key] = value
    before = {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["lr"] = 0.2
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.2
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
