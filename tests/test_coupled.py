"""Coupled channel groups (grouping "coupled"): groups over the input-channel slices of
several tensors, on every backend, against the float64 statement of shared/SPEC.md."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import compare

# a stem reading the image (its own groups), two consumers of the stem's 6 channels (one
# coupled group per channel over both), a linear layer reading the 5 channels of one of
# them flattened over 2 positions (two columns per group), a bias, an empty conv
COUPLED = [  # (shape, column ids)
    ((6, 3, 3, 3), [0, 1, 2]),
    ((5, 6, 3, 3), [3, 4, 5, 6, 7, 8]),
    ((4, 6, 1, 1), [3, 4, 5, 6, 7, 8]),
    ((7, 10), [9, 9, 10, 10, 11, 11, 12, 12, 13, 13]),
    ((5,), None),
    ((0, 4, 3, 3), [14, 15, 16, 17]),
]
# per group id: how strongly the gradients push it (0: noise only, so it ends zero)
LEVELS = [0.0, 2.5, 0.3, 0.0, 2.0, 0.4, 1.2, 0.0, 3.0, 0.0, 1.5, 0.2, 2.2, 0.0, 0, 0, 0, 0]


def coupled_problem(device="cpu", dtype=torch.float32, seed=0, lam=0.6):
    gen = torch.Generator().manual_seed(seed)
    params, ids = [], []
    for shape, cols in COUPLED:
        w = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        params.append(torch.nn.Parameter(w.to(device=device, dtype=dtype)))
        ids.append(None if cols is None else torch.tensor(cols, dtype=torch.int64))
    group = dict(params=params, lr=0.05, momentum=0.3, lam=lam, grouping="coupled",
                 channel_groups=ids)
    directions = []
    for (shape, cols), p in zip(COUPLED, params):
        d = torch.zeros(shape, dtype=torch.float64)
        if cols is not None:
            for j, g in enumerate(cols):
                d[:, j] = lam * LEVELS[g]
        else:
            d += lam
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        directions.append(d * sign)
    return group, directions, gen


def grads_of(directions, gen, params):
    return [(d + 0.3 * torch.randn(d.shape, generator=gen, dtype=torch.float64)).to(
        device=p.device, dtype=p.dtype) for d, p in zip(directions, params)]


def run_coupled(backend, device="cpu", dtype=torch.float32, steps=24, restart_at=12,
                lr_tensor=False):
    group, directions, gen = coupled_problem(device, dtype)
    params = group["params"]
    ref = Float64RMDA([copy.copy(group)], round_w=dtype in (torch.bfloat16, torch.float16))
    if lr_tensor:
        group = dict(group, lr=torch.tensor(group["lr"], device=device))
    opt = rmda_fused.RMDA([group], backend=backend)
    for k in range(1, steps + 1):
        grads = grads_of(directions, gen, params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        if k == restart_at:
            opt.restart()
            ref.restart()
    return opt, params, ref


def step_twins(opt, twin, params, twin_params, gen, steps=1):
    """Step two optimizers on the same random gradients; their parameters must stay equal."""
    for _ in range(steps):
        for p, q in zip(params, twin_params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_coupled_groups_match_the_float64_reference(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("covered in fp32/bf16 for the interpreter's sake")
    opt, params, ref = run_coupled(backend, device, dtype)
    assert compare(opt, params, ref) == []
    zero = sum(int(st.zero.sum()) for st in ref.states if st.zero is not None)
    assert zero > 0 and zero < sum(st.zero.numel() for st in ref.states if st.zero is not None)


def test_coupled_groups_with_a_tensor_lr(backend, device):
    opt, params, ref = run_coupled(backend, device, lr_tensor=True, steps=6, restart_at=3)
    assert compare(opt, params, ref) == []


def test_a_coupled_group_is_zero_in_every_member_at_once(fast_backend):
    opt, params, ref = run_coupled(fast_backend)
    b, c = (opt.state[params[i]]["zero_mask"] for i in (1, 2))
    assert torch.equal(b, c)  # both read the stem's channels: one group per channel
    fc = opt.state[params[3]]["zero_mask"]
    assert torch.equal(fc[0::2], fc[1::2])  # two columns per group


def test_a_chain_without_shared_channels_is_input_channel_exactly(fast_backend):
    """Groups that reach no other tensor take the input_channel kernel: bit-identical."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 3, 3, 3), (5, 6, 1, 1), (4, 5)]
    first = [torch.nn.Parameter(0.3 * torch.randn(s, generator=gen)) for s in shapes]
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    ids, start = [], 0
    for s in shapes:
        ids.append(torch.arange(start, start + s[1]))
        start += s[1]
    coupled = rmda_fused.RMDA([dict(params=first, grouping="coupled", channel_groups=ids)],
                              lr=0.1, lam=0.8, backend=fast_backend)
    plain = rmda_fused.RMDA(second, lr=0.1, lam=0.8, backend=fast_backend)
    step_twins(coupled, plain, first, second, gen, steps=5)
    for p, q in zip(first, second):
        assert torch.equal(coupled.state[p]["zero_mask"], plain.state[q]["zero_mask"])


def test_prox_point_and_apply_prox_point_span_the_coupled_group(fast_backend):
    opt, params, ref = run_coupled(fast_backend)
    for p, st in zip(params, ref.states):
        torch.testing.assert_close(opt.prox_point(p).double(), st.z, rtol=1e-5, atol=1e-6)
    opt.apply_prox_point()
    for p, st in zip(params, ref.states):
        if st.zero is not None:  # every column of a zero group is exactly zero
            for j in st.zero.nonzero().flatten().tolist():
                assert not p[:, j].any()


def test_structure_counts_one_entry_per_coupled_group(fast_backend):
    opt, params, ref = run_coupled(fast_backend)
    report = rmda_fused.structure.group_sparsity(opt)
    # 18 ids: the stem's 3, 6 shared, 5 of the linear layer, the empty conv's 4
    assert report.groups == 18
    zero_ids = set()
    for (shape, cols), st in zip(COUPLED, ref.states):
        if cols is not None:
            zero_ids |= {g for g, z in zip(cols, st.zero.tolist()) if z}
    assert report.zero_count == len(zero_ids)
    tracker = rmda_fused.IdentificationTracker(opt)
    tracker.update(0)
    assert tracker.flips == [len(zero_ids)]


def test_state_dict_round_trip_keeps_the_coupling(fast_backend):
    opt, params, _ = run_coupled(fast_backend, steps=4, restart_at=10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    group, *_ = coupled_problem()
    twin = rmda_fused.RMDA([dict(group, params=twin_params)], backend=fast_backend)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    step_twins(opt, twin, params, twin_params, torch.Generator().manual_seed(9))


def test_a_member_without_a_gradient_is_refused_by_name(fast_backend):
    group, directions, gen = coupled_problem()
    params = group["params"]
    opt = rmda_fused.RMDA([group], backend=fast_backend)
    for p, g in zip(params, grads_of(directions, gen, params)):
        p.grad = g
    params[2].grad = None  # shares the stem's channels with params[1]
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameters 1 \(shape \(5, 6, 3, 3\)\) and 2 "
                                         r"\(shape \(4, 6, 1, 1\)\) share coupled group"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


@pytest.mark.parametrize("channel_groups, message", [
    (None, "needs 'channel_groups'"),
    ([torch.arange(3)], "one entry per parameter"),
    ([torch.arange(4), None], "int64 tensor of 3 group ids"),
    ([torch.arange(3).int(), None], "int64 tensor of 3 group ids"),
    ([torch.tensor([0, -1, 2]), None], "ids must be >= 0"),
    ([torch.arange(3), torch.zeros(1, dtype=torch.int64)], "must be None"),
])
def test_bad_channel_groups_are_refused_with_the_parameter(channel_groups, message):
    params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3)), torch.nn.Parameter(torch.randn(4))]
    group = dict(params=params, grouping="coupled")
    if channel_groups is not None:
        group["channel_groups"] = channel_groups
    with pytest.raises(ValueError, match=message):
        rmda_fused.RMDA([group], lr=0.1, lam=0.1)


def test_the_functional_step_refuses_coupled_groups():
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="channel_groups"):
        rmda_fused.functional.rmda_step(
            [p], [p.clone()], [p.clone()], [torch.zeros_like(p)], [torch.zeros(())],
            [torch.zeros(())], [torch.zeros(3, dtype=torch.bool)], lr=0.1, momentum=0.1,
            lam=0.1, grouping="coupled")


@pytest.mark.filterwarnings("ignore:RMDA. momentum c=1.0")
def test_group_sizes_weight_the_threshold():
    """|G| counts the entries of every member: one group over a (4, 1) and a (12, 1) column
    has 16 entries, so its threshold is tau * 4."""
    a = torch.nn.Parameter(torch.ones(4, 1))
    b = torch.nn.Parameter(torch.ones(12, 1))
    ids = [torch.zeros(1, dtype=torch.int64)] * 2
    lam, lr = 0.2, 0.1
    opt = rmda_fused.RMDA([dict(params=[a, b], grouping="coupled", channel_groups=ids)],
                          lr=lr, lam=lam, momentum=1.0, backend="reference")
    a.grad, b.grad = torch.full((4, 1), -1.0), torch.full((12, 1), -1.0)
    opt.step()
    # t = 1: beta = 1, s = lr, A = lr, z = 1 + lr; norm = 4 (1 + lr); thr = lam * lr * 4
    z, norm, thr = 1 + lr, 4 * (1 + lr), lam * lr * math.sqrt(16)
    torch.testing.assert_close(a.detach(), torch.full((4, 1), z * (norm - thr) / norm))
    torch.testing.assert_close(b.detach(), torch.full((12, 1), z * (norm - thr) / norm))


class _ResidualConcatNet(torch.nn.Module):
    """A stem, a residual block on its stream, two branches concatenated, then flatten ->
    linear: every kind of coupling the builder follows."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 1))
        self.left, self.right = nn.Conv2d(6, 3, 1), nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(7 * 2 * 2, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def test_a_traced_model_with_residual_concat_and_flatten_matches_float64(backend, device):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = _ResidualConcatNet()
    groups = rmda_fused.param_groups(model, 0.4, "coupled", example_inputs=torch.randn(1, 2, 4, 4),
                                     lr=0.05, momentum=0.3)
    coupled = groups[0]
    assert coupled["grouping"] == "coupled"
    shared = torch.cat([ids for ids in coupled["channel_groups"] if ids is not None])
    assert shared.unique().numel() < shared.numel()  # some groups span columns
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.data = p.data.to(device)
    ref = Float64RMDA([copy.copy(g) for g in groups])
    opt = rmda_fused.RMDA(groups, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for k in range(1, 9):
        grads = [0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
        ref.step(grads)
        if k == 4:
            opt.restart()
            ref.restart()
    assert compare(opt, params, ref) == []
    assert any(st.zero is not None and st.zero.any() for st in ref.states)
