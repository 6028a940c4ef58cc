"""Structure metrics: group sparsity of z and W, prox points, identification tracking."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rmda_fused
from float64_reference import Float64RMDA
from helpers import GradStream, make_groups, rel_err, set_grads
from rmda_fused.structure import group_sparsity


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).double()


def test_group_sparsity_hand_computed():
    model = small_model()
    conv, fc = model[0], model[4]
    with torch.no_grad():
        conv.weight[:, 1] = 0.0  # input channel 1 of 3 (group of 4*3*3 = 36 entries)
        fc.weight[:, 0] = 0.0  # columns 0 and 2 of 4 (groups of 5 entries)
        fc.weight[:, 2] = 0.0
    opt = rmda_fused.RMDA(rmda_fused.param_groups(model, lam=0.5, lr=0.0, momentum=1.0))

    rep = group_sparsity(opt, of="W", model=model)
    assert [t.name for t in rep.tensors] == ["0.weight", "4.weight"]  # biases are not regularized
    assert [(t.groups, t.zero_count, t.group_size) for t in rep.tensors] == [(3, 1, 36), (4, 2, 5)]
    assert rep.tensors[0].fraction == pytest.approx(1 / 3)
    assert rep.tensors[1].fraction == pytest.approx(2 / 4)
    assert (rep.groups, rep.zero_count) == (7, 3)
    assert rep.fraction == pytest.approx(3 / 7)
    assert rep.weighted_fraction == pytest.approx((36 + 2 * 5) / (3 * 36 + 4 * 5))
    assert "3/7" in str(rep)

    # no step yet: z is not defined, and no group of it is reported zero
    assert group_sparsity(opt, of="z").zero_count == 0

    # lr = 0: z = prox(W0, 0) = W, so z's zero groups are exactly the hand-zeroed ones
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model(x).sum().backward()
    w_before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w_before))
    rep_z = group_sparsity(opt, of="z", model=model)
    assert [(t.groups, t.zero_count) for t in rep_z.tensors] == [(3, 1), (4, 2)]
    assert rep_z.weighted_fraction == pytest.approx(46 / 128)
    assert opt.state[conv.weight]["zero_mask"].tolist() == [False, True, False]
    assert opt.state[fc.weight]["zero_mask"].tolist() == [True, False, True, False]


def test_group_sparsity_output_channel_and_elementwise():
    w = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    v = nn.Parameter(torch.randn(2, 5, dtype=torch.float64))
    with torch.no_grad():
        w[2] = 0.0  # filter 2 of 4 (27 entries)
        v[0, 1] = v[1, 3] = v[1, 4] = 0.0  # 3 of 10 entries
    opt = rmda_fused.RMDA([dict(params=[w], grouping="output_channel"),
                           dict(params=[v], grouping="elementwise")], lam=0.1)
    rep = group_sparsity(opt, of="W")
    assert [(t.groups, t.zero_count, t.group_size) for t in rep.tensors] == [(4, 1, 27), (10, 3, 1)]
    assert rep.weighted_fraction == pytest.approx((27 + 3) / (4 * 27 + 10))
    assert rep.tensors[0].name == "param 0"
    with pytest.raises(ValueError, match="'x'"):
        group_sparsity(opt, of="x")


def _reference_run(steps, momentum=0.1, lam_scale=1.0, on_step=None):
    groups, _ = make_groups(torch.float64, momentum=momentum)
    for g in groups:
        g["lam"] *= lam_scale
    ref = Float64RMDA(groups)
    opt = rmda_fused.RMDA(groups)
    stream = GradStream(groups)
    params = stream.params
    for k in range(1, steps + 1):
        grads = stream.next(k)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        if on_step:
            on_step(k, opt, ref)
    return opt, params, ref


def test_zero_masks_match_reference_exactly():
    opt, params, ref = _reference_run(40)
    rep = group_sparsity(opt, of="z")
    states = [st for g in ref.groups if g["grouping"] != "none" for st in g["states"]]
    assert len(rep.tensors) == len(states)
    for t, st in zip(rep.tensors, states):
        assert t.zero_count == int(st.zero.sum())
    regularized = [p for g in opt.param_groups if g["grouping"] != "none" for p in g["params"]]
    for p, st in zip(regularized, states):
        assert torch.equal(opt.state[p]["zero_mask"], st.zero)
    assert 0 < rep.zero_count < rep.groups


def test_prox_point_and_apply_prox_point():
    opt, params, ref = _reference_run(40)
    zs = [opt.prox_point(p) for p in params]
    for p, z, st in zip(params, zs, ref.states):
        assert z.dtype == p.dtype and z.shape == p.shape
        assert rel_err(z, st.z) <= 1e-12
    # c = 0.1 < 1: W's groups only decay; z has exact zero groups W does not
    assert group_sparsity(opt, of="z").zero_count > group_sparsity(opt, of="W").zero_count
    opt.apply_prox_point()
    for p, z in zip(params, zs):
        assert torch.equal(p.detach(), z)
    rep_w, rep_z = group_sparsity(opt, of="W"), group_sparsity(opt, of="z")
    assert [t.zero_count for t in rep_w.tensors] == [t.zero_count for t in rep_z.tensors]
    for group in opt.param_groups:
        if group["grouping"] == "none":
            continue
        for p in group["params"]:
            mask = opt.state[p]["zero_mask"]
            w = p.detach()
            if group["grouping"] == "input_channel":
                assert not w[:, mask].any()
            elif group["grouping"] == "output_channel":
                assert not w[mask].any()
            else:
                assert not w.flatten()[mask].any()


def test_prox_point_without_a_step_is_w():
    p = nn.Parameter(torch.randn(6, 4, 3, 3))
    opt = rmda_fused.RMDA([p], lr=0.1, lam=1.0)
    z = opt.prox_point(p)
    assert torch.equal(z, p.detach()) and z.data_ptr() != p.data_ptr()
    p.grad = torch.randn_like(p)
    opt.step()
    opt.restart()  # t == 0 again: no z until the next step
    assert torch.equal(opt.prox_point(p), p.detach())
    before = p.detach().clone()
    opt.apply_prox_point()
    assert torch.equal(p.detach(), before)


def _set_masks(opt, params, masks):
    for p, m in zip(params, masks):
        opt.state[p]["zero_mask"].copy_(torch.tensor(m))


def test_identification_tracker_on_a_constructed_sequence():
    w1 = nn.Parameter(torch.randn(4, 3))  # 3 input-channel groups
    w2 = nn.Parameter(torch.randn(5, 2))  # 2
    b = nn.Parameter(torch.randn(5))  # unregularized: not part of the pattern
    opt = rmda_fused.RMDA([dict(params=[w1, w2]), dict(params=[b], grouping="none")], lr=0.0)
    tracker = rmda_fused.IdentificationTracker(opt)
    assert tracker.last_change is None and tracker.flips == []
    for p in (w1, w2, b):
        p.grad = torch.zeros_like(p)
    opt.step()
    F, T = False, True
    sequence = [
        (0, [[F, F, F], [F, F]], 0),  # dense, as the start: no change
        (1, [[T, F, F], [F, F]], 1),
        (2, [[T, F, F], [F, F]], 0),
        (5, [[T, F, T], [F, T]], 2),
        (6, [[F, F, T], [F, T]], 1),
        (7, [[F, F, T], [F, T]], 0),
    ]
    last = None
    for index, masks, flips in sequence:
        _set_masks(opt, [w1, w2], masks)
        tracker.update(index)
        last = index if flips else last
        assert tracker.last_change == last
        assert tracker.flips[-1] == flips
    assert tracker.flips == [f for *_, f in sequence]
    assert tracker.indices == [i for i, *_ in sequence]
    assert tracker.last_change == 6

    # round trip through state_dict, then one more change
    saved = tracker.state_dict()
    other = rmda_fused.IdentificationTracker(opt)
    other.load_state_dict(saved)
    assert other.last_change == 6 and other.flips == tracker.flips
    _set_masks(opt, [w1, w2], [[F, F, T], [T, T]])
    other.update(9)
    assert other.last_change == 9 and other.flips[-1] == 1


def test_identification_tracker_without_regularized_params():
    b = nn.Parameter(torch.randn(5))
    opt = rmda_fused.RMDA([b], grouping="none")
    tracker = rmda_fused.IdentificationTracker(opt)
    b.grad = torch.randn_like(b)
    opt.step()
    tracker.update(0)
    assert tracker.last_change is None and tracker.flips == []


def test_identification_tracker_follows_the_reference_pattern():
    """On a real run, per-step flips equal the changes of the reference's zero pattern."""
    expected, seen = [], {}

    def on_step(k, opt, ref):
        tracker = seen.setdefault("tracker", rmda_fused.IdentificationTracker(opt))
        tracker.update(k)
        pattern = torch.cat([
            st.zero if st.zero is not None
            else torch.zeros(_num_groups(tuple(st.W.shape), g["grouping"]), dtype=torch.bool)
            for g in ref.groups if g["grouping"] != "none" for st in g["states"]])
        previous = seen.get("pattern", torch.zeros_like(pattern))  # dense start
        expected.append(int((pattern != previous).sum()))
        seen["pattern"] = pattern

    _reference_run(40, on_step=on_step)
    tracker = seen["tracker"]
    assert tracker.flips == expected
    changed = [k for k, f in zip(range(1, 41), expected) if f]
    assert changed and tracker.last_change == changed[-1]


def _num_groups(shape, grouping):
    if grouping == "input_channel":
        return shape[1]
    if grouping == "output_channel":
        return shape[0]
    n = 1
    for s in shape:
        n *= s
    return n
