"""kernels/rmda_coupled.py (the partials and apply phases of a coupled-group step) through
the triton backend, against an independent float64 statement of the two phases and of the
reduce between them (the coupled-group contract: partials -> reduce -> apply)."""
from __future__ import annotations

import math

import pytest
import torch

from kernel_testing import Float64, Params, check_close, grads_for
from rmda_fused.backends import triton as triton_backend
from rmda_fused.batch import StepBatch, StepOptions, state_dtype
from rmda_fused.grouping import memory_group_view

# 7x7 taps fold a run over several band rows; 200 rows of 3x3 split a band over programs
SHAPES = [(6, 5, 3, 3), (16, 7, 1, 1), (9, 13), (3, 1), (0, 4), (4, 0), (4, 3, 7, 7),
          (200, 3, 3, 3)]
TINY_TILE = (4, 8, 4)  # folds and splits the bands of the small shapes too


def coupled_ids(shapes):
    """Per tensor, the coupled group id of each column: columns j of the first two tensors
    form group j % 4 (coupled within and across tensors); every other column is a group of
    its own."""
    ids, fresh = [], 4
    for i, shape in enumerate(shapes):
        if i < 2:
            ids.append([j % 4 for j in range(shape[1])])
        else:
            ids.append(list(range(fresh, fresh + shape[1])))
            fresh += shape[1]
    return ids


class CoupledFloat64(Float64):
    """The three phases in float64, one column at a time; W rounded to the parameter dtype
    per write. Every tensor of a coupled param group steps together (one t, one A)."""

    def __init__(self, params: Params, ids):
        super().__init__(params)
        self.ids = ids

    def partials(self, grads, lr, grad_scale=1.0):
        self.z, out = [], []
        for i, g in enumerate(grads):
            self.t[i] += 1
            beta = math.sqrt(self.t[i])
            s = lr * beta
            self.A[i] += s
            self.V[i] = self.V[i] + s * (g.detach().cpu().double() / grad_scale)
            z = self.W0[i] - self.V[i] / beta
            self.z.append(z)
            out.append(torch.tensor([float((z[:, k] ** 2).sum()) for k in range(z.shape[1])],
                                    dtype=torch.float64))
        return out

    def scales(self, partials, lam):
        n_ids = 1 + max(k for ids in self.ids for k in ids)
        totals, sizes = [0.0] * n_ids, [0] * n_ids
        for part, ids, w in zip(partials, self.ids, self.W):
            for column, k in enumerate(ids):
                totals[k] += float(part[column])
                sizes[k] += w.numel() // w.shape[1]
        tau = lam * self.A[0] / math.sqrt(self.t[0])
        scale = []
        for total, size in zip(totals, sizes):
            norm, thr = math.sqrt(total), tau * math.sqrt(size)
            scale.append((norm - thr) / norm if norm > thr else 0.0)
        return [torch.tensor([scale[k] for k in ids], dtype=torch.float64) for ids in self.ids]

    def apply(self, scales, momentum):
        for i, scale in enumerate(scales):
            shape = (1, -1) + (1,) * (self.W[i].dim() - 2)
            w = (1 - momentum) * self.W[i] + momentum * (self.z[i] * scale.reshape(shape))
            self.W[i] = w.to(self.dtypes[i]).double()


def coupled_batch(params: Params, grads) -> StepBatch:
    views = [memory_group_view(p, "input_channel") for p in params.p]
    return StepBatch(params.p, list(grads), params.w0, params.v, params.t, params.a,
                     [None] * len(params.p), views)


def unwritten(params: Params):
    """One partials buffer per tensor, NaN until the kernel writes it."""
    return [torch.full((p.shape[1],), float("nan"), dtype=v.dtype, device=v.device)
            for p, v in zip(params.p, params.v)]


def check_partials(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(float(w.abs().max()) if w.numel() else 0.0, 1e-3)
        err = float((g.cpu().double() - w).abs().max()) / scale if w.numel() else 0.0
        assert err <= tol, f"{what} partials of tensor {i}: rel err {err:.3g} > {tol}"


def run_steps(params, exact, steps, tol, lam=0.4, lr_tensor=False, **scaling):
    """``steps`` coupled steps through the backend and the float64 statement, with a
    restart halfway; returns (zero, kept) counts of the group scales seen."""
    gen = torch.Generator().manual_seed(1)
    state = params.v[0].dtype
    device = params.p[0].device
    grad_scale = scaling.get("grad_scale")
    zero = kept = 0
    for k in range(steps):
        lr = 0.05 * (1.0 + 0.5 * (k % 4))  # a scheduler moves lr every step
        grads = grads_for(params, gen)
        if grad_scale is not None:
            grads = [g * float(grad_scale) for g in grads]
        options = StepOptions(torch.tensor(lr, dtype=torch.float64, device=device)
                              if lr_tensor else lr, 0.3, lam, "coupled", **scaling)
        batch = coupled_batch(params, grads)
        partials = unwritten(params)
        triton_backend.rmda_partials_(batch, options, partials)
        want = exact.partials(grads, lr, 1.0 if grad_scale is None else float(grad_scale))
        check_partials(partials, want, tol, f"step {k}")
        scales = exact.scales(want, lam)
        triton_backend.rmda_apply_(batch, options,
                                   [s.to(device=device, dtype=state) for s in scales])
        exact.apply(scales, 0.3)
        check_close(params, exact, tol, f"step {k}")
        zero += sum(int((s == 0).sum()) for s in scales)
        kept += sum(int((s > 0).sum()) for s in scales)
        if k == steps // 2 - 1:  # restart: W0 <- W; V, t, A <- 0
            params.restart()
            exact.restart()
    return zero, kept


@pytest.fixture
def tile(request, monkeypatch):
    from rmda_fused.kernels import rmda_coupled

    if request.param is not None:
        monkeypatch.setattr(rmda_coupled, "TILE", request.param)
    return request.param


@pytest.mark.parametrize("tile", [None, TINY_TILE], indirect=True,
                         ids=["default_tile", "tiny_tile"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_steps_match_float64(device, dtype, tol, tile):
    from rmda_fused.kernels import rmda_coupled

    shapes = SHAPES if tile is None else SHAPES[:-1]  # tiny tiles split the big one slowly
    views = [tuple(memory_group_view(torch.empty(s), "input_channel")) for s in shapes]
    _, bands, reduces, _ = rmda_coupled.plan(views, *(tile or rmda_coupled.TILE))
    assert reduces and any(b[4] < 0 for b in bands), "both band kinds must be exercised"
    params = Params(shapes, "input_channel", dtype=dtype, device=device, zero_channel=True)
    exact = CoupledFloat64(params, coupled_ids(shapes))
    zero, kept = run_steps(params, exact, 6, tol)
    assert zero > 0 and kept > 0, "the scenario must zero some groups and keep others"
    assert all(v.dtype == state_dtype(dtype) for v in params.v)


def test_bf16_params_with_fp32_state(device):
    """bf16 W and W0, fp32 V: V and the partials are fp32-exact; W is within a bf16
    rounding of the float64 statement and, rounded to nearest even as the statement is,
    almost always its very bits (truncating would miss about half of them)."""
    params = Params(SHAPES[:4], "input_channel", dtype=torch.bfloat16, device=device)
    exact = CoupledFloat64(params, coupled_ids(SHAPES[:4]))
    run_steps(params, exact, 4, 2 ** -7)
    assert all(p.dtype == torch.bfloat16 for p in params.p)
    differ = sum(int((p.cpu().double() != w).sum()) for p, w in zip(params.p, exact.W))
    assert differ <= 0.01 * sum(p.numel() for p in params.p), f"{differ} W entries differ"
    assert all(v.dtype == torch.float32 for v in params.v)
    for v, want in zip(params.v, exact.V):
        torch.testing.assert_close(v.double(), want, rtol=2e-6, atol=1e-7)


def test_channels_last(device):
    """channels_last weights are walked through their memory view (O * k*k, I, 1): the
    groups are still the input channels."""
    shapes = [(6, 5, 3, 3), (16, 7, 1, 1), (5, 4, 3, 3)]
    params = Params(shapes, "input_channel", device=device)
    for key in ("p", "w0", "v"):
        values = getattr(params, key)
        values[:] = [x.contiguous(memory_format=torch.channels_last) for x in values]
    assert tuple(memory_group_view(params.p[0], "input_channel")) == (54, 5, 1)
    exact = CoupledFloat64(params, coupled_ids(shapes))
    gen = torch.Generator().manual_seed(5)
    for k in range(3):
        grads = [g.contiguous(memory_format=torch.channels_last)
                 for g in grads_for(params, gen)]
        options = StepOptions(0.05, 0.3, 0.4, "coupled")
        batch = coupled_batch(params, grads)
        partials = unwritten(params)
        triton_backend.rmda_partials_(batch, options, partials)
        want = exact.partials(grads, 0.05)
        check_partials(partials, want, 2e-5, f"step {k}")
        scales = exact.scales(want, 0.4)
        triton_backend.rmda_apply_(batch, options, [s.float() for s in scales])
        exact.apply(scales, 0.3)
        check_close(params, exact, 2e-5, f"step {k}")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params.p)


def test_grad_scale_found_inf_and_lr_tensor(device):
    shapes = SHAPES[:3]
    params = Params(shapes, "input_channel", device=device)
    exact = CoupledFloat64(params, coupled_ids(shapes))
    scale = torch.tensor(1024.0, device=device)
    run_steps(params, exact, 4, 2e-5, lr_tensor=True, grad_scale=scale,
              found_inf=torch.zeros((), device=device))

    # an overflow step changes nothing: not t, A, V, W, nor the partials buffers
    before = params.clone()
    grads = [torch.full_like(p, float("inf")) for p in params.p]
    options = StepOptions(torch.tensor(0.05, device=device), 0.3, 0.4, "coupled", scale,
                          torch.ones((), device=device))
    batch = coupled_batch(params, grads)
    partials = unwritten(params)
    triton_backend.rmda_partials_(batch, options, partials)
    assert all(bool(x.isnan().all()) for x in partials), "found_inf wrote partials"
    triton_backend.rmda_apply_(batch, options, [torch.ones_like(x) for x in partials])
    for key in ("p", "v", "t", "a"):
        for x, y in zip(getattr(params, key), getattr(before, key)):
            assert torch.equal(x, y), f"found_inf changed {key}"


def test_launches_buckets_and_interpreter(device):
    """Launch counts per phase, one launch set per dtype bucket with the per-tensor buffers
    mapped to their tensors, and the interpreter exactly where the tensors are on CPU."""
    from rmda_fused import kernels

    assert kernels.interpreted() == (device == "cpu")
    single = Params([(6, 5, 3, 3)], "input_channel", device=device)
    split = Params([(200, 3, 3, 3)], "input_channel", device=device)
    empty = Params([(4, 0)], "input_channel", device=device)
    options = StepOptions(0.05, 0.3, 0.4, "coupled")
    for params, partial_launches, apply_launches in ((single, 2, 1), (split, 3, 1),
                                                     (empty, 1, 0)):
        batch = coupled_batch(params, [torch.ones_like(p) for p in params.p])
        buffers = unwritten(params)
        assert triton_backend.rmda_partials_(batch, options, buffers) == partial_launches
        assert triton_backend.rmda_apply_(batch, options,
                                          [torch.ones_like(b) for b in buffers]) == apply_launches
        assert [float(t) for t in params.t] == [1.0]  # an empty tensor still counts steps
    assert triton_backend.rmda_partials_(StepBatch(*[[] for _ in range(8)]), options, []) == 0

    # the same tensors and buffers again: every table is a cache hit
    from rmda_fused.kernels import _common, rmda_coupled

    batch = coupled_batch(single, [torch.ones_like(p) for p in single.p])
    buffers = unwritten(single)
    caches = (rmda_coupled._PLAN_CACHE, rmda_coupled._TARGET_CACHE, _common._META_CACHE)
    for k in range(3):
        triton_backend.rmda_partials_(batch, options, buffers)
        triton_backend.rmda_apply_(batch, options, buffers)
        if k == 0:
            builds = [cache.builds for cache in caches]
    assert [cache.builds for cache in caches] == builds, "a stable batch rebuilt a table"

    # fp32, fp64, fp32: two buckets, the fp64 one in the middle of the lists
    f32 = Params([(6, 5, 3, 3), (9, 13)], "input_channel", device=device, seed=3)
    f64 = Params([(16, 7, 1, 1)], "input_channel", dtype=torch.float64, device=device)
    mixed = object.__new__(Params)
    for key in ("p", "w0", "v", "t", "a"):
        first, second = getattr(f32, key)
        setattr(mixed, key, [first, getattr(f64, key)[0], second])
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i),
                         dtype=torch.float64).to(device=device, dtype=p.dtype)
             for i, p in enumerate(mixed.p)]
    batch = coupled_batch(mixed, grads)
    partials = unwritten(mixed)
    assert triton_backend.rmda_partials_(batch, options, partials) == 4
    for i, (w0, g, part) in enumerate(zip(mixed.w0, grads, partials)):
        z = w0.double() - 0.05 * g.double()  # t = 1: beta = 1, s = lr
        want = torch.tensor([float((z[:, k] ** 2).sum()) for k in range(z.shape[1])])
        torch.testing.assert_close(part.double().cpu(), want.double(), rtol=1e-5, atol=0)
    before = [p.clone().double() for p in mixed.p]  # .double() of fp64 is no copy
    scales = [torch.arange(x.numel(), dtype=x.dtype, device=device) / x.numel()
              for x in partials]
    assert triton_backend.rmda_apply_(batch, options, scales) == 2
    for w, w0, g, scale, p in zip(before, mixed.w0, grads, scales, mixed.p):
        shape = (1, -1) + (1,) * (p.dim() - 2)
        z = w0.double() - 0.05 * g.double()
        want = 0.7 * w + 0.3 * z * scale.double().reshape(shape)
        torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-7)


def test_rejects_buffers_that_do_not_fit(device):
    params = Params([(6, 5, 3, 3), (9, 13)], "input_channel", device=device)
    batch = coupled_batch(params, [torch.zeros_like(p) for p in params.p])
    options = StepOptions(0.05, 0.3, 0.4, "coupled")
    good = unwritten(params)
    for bad in (good[:1], [good[0], good[1][:5]], [good[0], good[1].double()]):
        with pytest.raises(ValueError):
            triton_backend.rmda_partials_(batch, options, bad)
    assert [float(t) for t in params.t] == [0.0, 0.0]  # checked before any launch

