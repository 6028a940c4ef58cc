"""kernels/rmda_grouped.py (input_channel / output_channel) through the triton backend,
against an independent float64 statement of docs/algorithm.md and the reference backend."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import Float64, Params, check_close, grads_for, reference_step

# (4, 2, 7, 7): input_channel runs of 49 > BLOCK_L cut into pieces (both tiles)
CONV_SHAPES = [(6, 4, 3, 3), (5, 3, 1, 1), (10, 12), (7, 5, 3, 3), (0, 3, 3, 3), (4, 0),
               (4, 2, 7, 7)]
# (BLOCK_R, BLOCK_L, BLOCK_G): the defaults, and tiny tiles that make most bands of these
# small shapes span several tiles (two walks; runs packed side by side or in pieces)
TILES = [None, (2, 16, 4)]


@pytest.fixture
def tile(request, monkeypatch):
    from rmda_fused.kernels import rmda_grouped

    if request.param is not None:
        monkeypatch.setattr(rmda_grouped, "TILES", {g: request.param for g in rmda_grouped.TILES})
    return request.param


@pytest.mark.parametrize("tile", TILES, indirect=True, ids=["default_tile", "tiny_tile"])
@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
def test_many_steps_match_float64_and_reference(device, grouping, tile):
    params = Params(CONV_SHAPES, grouping, device=device, zero_channel=True)
    ref_backend = params.clone()
    exact = Float64(params)
    gen = torch.Generator().manual_seed(1)
    zeros_seen = 0
    steps = 24 if tile is None else 8  # the interpreter runs many tiny tiles slowly
    for k in range(steps):
        lr = 0.05 * (1.0 + 0.5 * (k % 4))  # the scheduler moves lr every step
        kw = dict(lr=lr, momentum=0.3, lam=0.4)
        grads = grads_for(params, gen)
        params.step(grads, **kw)
        reference_step(ref_backend, grads, **kw)
        exact.step(grads, **kw)
        check_close(params, exact, 2e-5, f"step {k}")
        zeros_seen += sum(int(m.sum()) for m in params.m)
        if k == steps // 2 - 1:  # restart mid-run: W0 <- W, V, t, A <- 0
            params.restart()
            ref_backend.restart()
            exact.restart()
    assert zeros_seen > 0, "the scenario must zero some groups"
    for mine, theirs in zip(params.m, ref_backend.m):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(params.p, ref_backend.p):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
def test_zero_and_empty_groups(device, grouping):
    params = Params([(4, 3, 3, 3), (4, 0), (0, 3)], grouping, device=device)
    for p, w0 in zip(params.p, params.w0):
        p.zero_()
        w0.zero_()
    grads = [torch.zeros_like(p) for p in params.p]
    params.step(grads, lam=0.1)
    for p, v, m in zip(params.p, params.v, params.m):
        assert not torch.isnan(p).any() and not torch.isnan(v).any()
        assert bool(m.all()), "a group with ||z|| == 0 is zero (never NaN)"
    assert [float(t) for t in params.t] == [1.0, 1.0, 1.0]  # empty tensors still count steps


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, None)])
def test_dtypes(device, dtype, tol):
    shapes = [(6, 4, 3, 3), (10, 12)]
    params = Params(shapes, "input_channel", dtype=dtype, device=device)
    ref_backend = params.clone()
    exact = Float64(params)
    gen = torch.Generator().manual_seed(2)
    for k in range(12):
        grads = grads_for(params, gen)
        params.step(grads, lr=0.04, momentum=0.25, lam=0.3)
        reference_step(ref_backend, grads, lr=0.04, momentum=0.25, lam=0.3)
        exact.step(grads, lr=0.04, momentum=0.25, lam=0.3)
    assert all(v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
               for v in params.v)
    if tol is not None:
        check_close(params, exact, tol)
    else:  # bf16 W, fp32 state: V is fp32-exact; W within a bf16 rounding of the reference
        for p, q in zip(params.p, ref_backend.p):
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p, q, rtol=2 ** -7, atol=2 ** -7)
        for v, u in zip(params.v, ref_backend.v):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_grad_scale_and_found_inf(device):
    shapes = [(6, 4, 3, 3), (10, 12)]
    params = Params(shapes, "output_channel", device=device)
    exact = Float64(params)
    gen = torch.Generator().manual_seed(3)
    scale = torch.tensor(1024.0, device=device)
    ok = torch.zeros((), device=device)
    for k in range(6):
        grads = grads_for(params, gen)
        params.step([g * 1024.0 for g in grads], grad_scale=scale, found_inf=ok)
        exact.step(grads)
        check_close(params, exact, 2e-5)
        if k == 2:  # an overflow step changes nothing at all, not even t
            before = params.clone()
            params.step([torch.full_like(g, float("inf")) for g in grads], grad_scale=scale,
                        found_inf=torch.ones((), device=device))
            for key in ("p", "v", "t", "a", "m"):
                for x, y in zip(getattr(params, key), getattr(before, key)):
                    assert torch.equal(x, y), f"found_inf changed {key}"


def test_launch_budget_and_no_respecialization(device, monkeypatch):
    """lr moves every step: the kernels must see the same non-tensor arguments each time
    (nothing lr-dependent is a constexpr or a specialized scalar), so they never recompile."""
    from rmda_fused.kernels import rmda_grouped

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(tuple(a for a in args if not isinstance(a, torch.Tensor))
                            + tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                return self.kernel[grid](*args, **kwargs)
            return launch

    kernels = []
    for module, name in ((rmda_grouped, "_rmda_grouped_kernel"),):
        kernels.append(getattr(module, name))
        monkeypatch.setattr(module, name, Spy(kernels[-1]))

    def compiled():  # number of compiled variants (GPU only: the interpreter compiles none)
        if device != "cuda":
            return None
        index = torch.cuda.current_device()
        return [len(k.device_caches[index][0]) for k in kernels]

    small = Params([(6, 4, 3, 3), (10, 12)], "input_channel", device=device)
    big = Params([(200, 3)], "input_channel", device=device)  # 200 rows > BLOCK_R
    gen = torch.Generator().manual_seed(4)
    for k, lr in enumerate((0.1, 0.05, 0.013, torch.tensor(0.02, device=device))):
        seen.clear()
        assert small.step(grads_for(small, gen), lr=lr) == 1  # one-walk bands
        first = list(seen)
        assert big.step(grads_for(big, gen), lr=lr) == 1  # two-walk bands, same launch
        if k == 0:
            signature, variants = first, compiled()
        elif not isinstance(lr, torch.Tensor):
            assert first == signature, "an lr change altered the kernel arguments"
            assert compiled() == variants, "an lr change compiled a new kernel variant"


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
def test_result_does_not_depend_on_task_order_or_grid(device, grouping, monkeypatch):
    """The task table reversed and walked by 2 programs (the interpreter runs programs in
    id order: the task of each tensor that arrives last, and so writes t and A, changes):
    every step bit for bit the same as in plan order, t and A advanced once per step."""
    from rmda_fused.kernels import rmda_grouped

    monkeypatch.setattr(rmda_grouped, "TILES", {g: (2, 16, 4) for g in rmda_grouped.TILES})
    shapes = [(6, 4, 3, 3), (10, 12), (4, 0), (5, 3, 1, 1)]
    in_order = Params(shapes, grouping, device=device, zero_channel=True)
    permuted = in_order.clone()
    gen = torch.Generator().manual_seed(11)
    plan = rmda_grouped.plan

    def reversed_plan(*args):
        dims, tasks = plan(*args)
        return dims, tasks[::-1]

    for k in range(3):
        grads = grads_for(in_order, gen)
        rmda_grouped._PLAN_CACHE.clear()
        in_order.step(grads)
        rmda_grouped._PLAN_CACHE.clear()
        with monkeypatch.context() as patch:
            patch.setattr(rmda_grouped, "plan", reversed_plan)
            patch.setattr(rmda_grouped, "PROGRAMS", 2)
            permuted.step(grads)
        for key in ("p", "v", "t", "a", "m"):
            for x, y in zip(getattr(in_order, key), getattr(permuted, key)):
                assert torch.equal(x, y), f"step {k}: {key} differs"
        assert [float(t) for t in permuted.t] == [k + 1.0] * len(shapes)
    rmda_grouped._PLAN_CACHE.clear()


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
def test_channels_last_in_the_grouped_kernels(device, grouping, monkeypatch):
    """A channels_last parameter whose gradient and state share its layout runs in the
    grouped kernels over the memory-order view (channel groups are still (outer, groups,
    inner) slices of memory); one whose state is contiguous runs on the reference backend."""
    from kernel_testing import functional_step, spy_on_triton

    params = Params([(6, 4, 3, 3), (5, 3, 3, 3)], grouping, device=device)
    for key in ("p", "w0", "v"):
        getattr(params, key)[0] = getattr(params, key)[0].contiguous(
            memory_format=torch.channels_last)
    params.p[1] = params.p[1].contiguous(memory_format=torch.channels_last)
    expected = params.clone()
    gen = torch.Generator().manual_seed(8)
    fused = spy_on_triton(monkeypatch)
    for _ in range(3):
        grads = [g.contiguous(memory_format=torch.channels_last) for g in grads_for(params, gen)]
        functional_step(params, grads)
        reference_step(expected, grads)
    assert [[tuple(p.shape) for p in batch.params] for batch in fused] == [[(6, 4, 3, 3)]] * 3
    for mine, theirs in zip(params.p, expected.p):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(params.m, expected.m):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel"])
def test_aligned_bucket(device, grouping, monkeypatch):
    """Shapes whose runs, strides and band offsets are multiples of 4 on 16-byte arrays take
    the ALIGNED variant (the hints that let the compiler vectorize), with the same result;
    one odd run makes the whole bucket unaligned."""
    from rmda_fused.kernels import rmda_grouped

    chosen = []
    kernel = rmda_grouped._rmda_grouped_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                chosen.append(kwargs["ALIGNED"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(rmda_grouped, "_rmda_grouped_kernel", Spy())
    for shapes, aligned in (([(8, 4, 2, 2), (12, 8)], True), ([(8, 4, 2, 2), (5, 3)], False)):
        params = Params(shapes, grouping, device=device)
        expected = params.clone()
        gen = torch.Generator().manual_seed(12)
        for _ in range(3):
            grads = grads_for(params, gen)
            params.step(grads)
            reference_step(expected, grads)
        assert chosen[-3:] == [aligned] * 3
        for mine, theirs in zip(params.p, expected.p):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
