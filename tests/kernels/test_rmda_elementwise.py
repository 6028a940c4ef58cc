"""kernels/rmda_elementwise.py (grouping none and elementwise L1) and the backend's plumbing
(dtype buckets, caches, lr/grad_scale/found_inf on the device), against float64 and the
reference backend."""
from __future__ import annotations

import pytest
import torch

from kernel_testing import Float64, Params, check_close, grads_for, reference_step
from rmda_fused.batch import state_dtype


@pytest.fixture
def small_block(monkeypatch):
    """Blocks of 64 elements, so small tensors span several tiles of the work list."""
    from rmda_fused.kernels import rmda_elementwise

    monkeypatch.setattr(rmda_elementwise, "BLOCK", 64)


@pytest.mark.parametrize("grouping,shapes", [
    ("none", [(6,), (10,), (130,), (0,)]),
    ("elementwise", [(6, 4, 3, 3), (7, 5, 3, 3), (4, 0), (10, 12), (5,)]),
])
def test_many_steps_match_float64_and_reference(device, grouping, shapes, small_block):
    params = Params(shapes, grouping, device=device, zero_channel=True)
    ref_backend = params.clone()
    exact = Float64(params)
    gen = torch.Generator().manual_seed(5)
    zeros_seen = 0
    for k in range(30):
        kw = dict(lr=0.03 * (1 + k % 3), momentum=0.2, lam=0.3)
        grads = grads_for(params, gen)
        assert params.step(grads, **kw) == 1  # scalars and elements in one launch
        reference_step(ref_backend, grads, **kw)
        exact.step(grads, **kw)
        check_close(params, exact, 2e-5, f"step {k}")
        zeros_seen += sum(int(m.sum()) for m in params.m if m is not None)
        if k == 16:
            for state in (params, ref_backend, exact):
                state.restart()
    assert grouping == "none" or zeros_seen > 0
    for mine, theirs in zip(params.p, ref_backend.p):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_make_one_bucket_each(device):
    """fp32, bf16 (fp32 state), fp16 and fp64 params in one call: 4 buckets, a launch each."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    params = Params([(40,)] * len(dtypes), "elementwise", device=device)
    for i, dt in enumerate(dtypes):
        f = state_dtype(dt)
        params.p[i] = params.p[i].to(dt)
        params.w0[i] = params.w0[i].to(dt)
        params.v[i], params.t[i], params.a[i] = (x.to(f) for x in (params.v[i], params.t[i],
                                                                  params.a[i]))
    ref_backend = params.clone()
    exact = Float64(params)
    gen = torch.Generator().manual_seed(6)
    for _ in range(10):
        grads = grads_for(params, gen)
        assert params.step(grads, lam=0.2) == 4
        reference_step(ref_backend, grads, lam=0.2)
        exact.step(grads, lam=0.2)
    for i, dt in enumerate(dtypes):
        assert params.p[i].dtype == dt
        if dt in (torch.bfloat16, torch.float16):  # fp32 ulps may flip one W rounding
            torch.testing.assert_close(params.p[i], ref_backend.p[i], rtol=2 ** -7, atol=1e-3)
        else:
            tol = 1e-12 if dt == torch.float64 else 1e-5
            err = float((params.p[i].double().cpu() - exact.W[i]).abs().max())
            assert err <= tol, f"{dt}: {err}"
        assert torch.equal(params.t[i], ref_backend.t[i])


def test_grad_scale_found_inf_and_tensor_lr(device):
    params = Params([(6, 4, 3, 3), (9,)], "elementwise", device=device)
    exact = Float64(params)
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor(256.0, device=device)
    lr = torch.tensor(0.05, device=device)  # a device lr is read by the kernel, never synced
    for k in range(5):
        grads = grads_for(params, gen)
        lr.fill_(0.05 / (k + 1))
        params.step([g * 256.0 for g in grads], lr=lr, grad_scale=scale,
                    found_inf=torch.zeros((), device=device))
        exact.step(grads, lr=0.05 / (k + 1))
        check_close(params, exact, 2e-5)
    before = params.clone()
    params.step([torch.full_like(p, float("nan")) for p in params.p], lr=lr,
                grad_scale=scale, found_inf=torch.ones((), device=device))
    for key in ("p", "v", "t", "a", "m"):
        for x, y in zip(getattr(params, key), getattr(before, key)):
            assert torch.equal(x, y), f"a found_inf step changed {key}"


def test_result_does_not_depend_on_which_program_arrives_last(device, small_block,
                                                              monkeypatch):
    """The tile table reversed (on CPU the interpreter runs programs in id order, so the
    last tile of each tensor to arrive, which writes t and A, is its first one instead of
    its last): every step bit for bit the same, and t and A advance once per step."""
    from rmda_fused.kernels import rmda_elementwise

    shapes = [(6, 4, 3, 3), (130,), (0,), (9,)]
    forward = Params(shapes, "elementwise", device=device)
    backward = forward.clone()
    gen = torch.Generator().manual_seed(10)
    tiles = rmda_elementwise._tiles
    for k in range(4):
        grads = grads_for(forward, gen)
        rmda_elementwise._TILE_CACHE.clear()
        forward.step(grads)
        rmda_elementwise._TILE_CACHE.clear()
        monkeypatch.setattr(rmda_elementwise, "_tiles", lambda *a: tiles(*a).flip(0))
        backward.step(grads)
        monkeypatch.setattr(rmda_elementwise, "_tiles", tiles)
        for key in ("p", "v", "t", "a", "m"):
            for x, y in zip(getattr(forward, key), getattr(backward, key)):
                assert x is y is None or torch.equal(x, y), f"step {k}: {key} differs"
        assert [float(t) for t in backward.t] == [k + 1.0] * len(shapes)
    rmda_elementwise._TILE_CACHE.clear()


def test_tables_are_cached_while_pointers_are_unchanged(device):
    from rmda_fused.kernels import _common

    params = Params([(6, 4, 3, 3), (9,)], "none", device=device)
    grads = [torch.ones_like(p) for p in params.p]
    params.step(grads)
    tables = _common._META_CACHE.builds
    params.step(grads)
    assert _common._META_CACHE.builds == tables  # same pointers: the same table
    fresh = [g.clone() for g in grads]  # new grad storage (zero_grad(set_to_none=True))
    expected = params.clone()
    reference_step(expected, fresh)
    params.step(fresh)
    assert _common._META_CACHE.builds == tables + 1
    for mine, theirs in zip(params.p, expected.p):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grouping, fused_shapes", [
    ("none", [(4, 3, 3, 3), (7,)]),
    ("elementwise", [(7,)]),  # its mask follows the logical order: reference takes it
])
def test_channels_last_in_the_kernels(device, grouping, fused_shapes, monkeypatch):
    """Through the functional core a channels_last parameter (gradient and state in the
    same layout) runs in the kernels, which walk memory, except for elementwise groups."""
    from kernel_testing import functional_step, spy_on_triton

    params = Params([(4, 3, 3, 3), (7,)], grouping, device=device)
    for key in ("p", "w0", "v"):
        getattr(params, key)[0] = getattr(params, key)[0].contiguous(
            memory_format=torch.channels_last)
    expected = params.clone()
    grads = grads_for(params, torch.Generator().manual_seed(9))
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
    fused = spy_on_triton(monkeypatch)
    functional_step(params, grads)
    reference_step(expected, grads)
    assert [[tuple(p.shape) for p in batch.params] for batch in fused] == [fused_shapes]
    for mine, theirs in zip(params.p, expected.p):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_handles_only_the_device_it_was_built_for(device):
    from rmda_fused.backends import triton as backend

    assert backend.unavailable_reason() is None
    assert backend.handles(torch.device(device))
    other = "cuda" if device == "cpu" else "cpu"
    assert not backend.handles(torch.device(other))  # auto never picks it for that device
