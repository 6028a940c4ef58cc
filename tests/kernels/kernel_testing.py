"""Helpers of the Triton kernel tests: parameter state, a step through a backend, and an
independent float64 statement of docs/algorithm.md, "The update" (no rmda_fused code) to
compare against."""
from __future__ import annotations

import math

import torch

from rmda_fused.backends import reference
from rmda_fused.backends import triton as triton_backend
from rmda_fused.batch import StepBatch, StepOptions, state_dtype
from rmda_fused.grouping import group_view, num_groups


class Params:
    """Parameters plus RMDA state laid out as rmda_fused.optimizer keeps it."""

    def __init__(self, shapes, grouping, dtype=torch.float32, device="cpu", seed=0,
                 zero_channel=False):
        gen = torch.Generator().manual_seed(seed)
        f = state_dtype(dtype)
        self.grouping = grouping
        self.p, self.w0, self.v, self.t, self.a, self.m = [], [], [], [], [], []
        for shape in shapes:
            w = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
            if zero_channel and len(shape) >= 2 and shape[1] > 1:
                w[:, 1] = 0.0
            w = w.to(device=device, dtype=dtype)
            self.p.append(w)
            self.w0.append(w.clone())
            self.v.append(torch.zeros(shape, dtype=f, device=device))
            self.t.append(torch.zeros((), dtype=f, device=device))
            self.a.append(torch.zeros((), dtype=f, device=device))
            self.m.append(None if grouping == "none" else
                          torch.zeros(num_groups(shape, grouping), dtype=torch.bool, device=device))

    def clone(self):
        other = object.__new__(Params)
        other.grouping = self.grouping
        for key in ("p", "w0", "v", "t", "a"):
            setattr(other, key, [x.clone() for x in getattr(self, key)])
        other.m = [None if x is None else x.clone() for x in self.m]
        return other

    def step(self, grads, backend=triton_backend, lr=0.05, momentum=0.2, lam=0.5,
             grad_scale=None, found_inf=None):
        return backend.rmda_step_(
            self.batch(grads),
            StepOptions(lr, momentum, lam, self.grouping, grad_scale, found_inf))

    def batch(self, grads):
        views = [group_view(p.shape, self.grouping) for p in self.p]
        return StepBatch(self.p, list(grads), self.w0, self.v, self.t, self.a, self.m, views)

    def restart(self):
        for p, w0, v, t, a in zip(self.p, self.w0, self.v, self.t, self.a):
            w0.copy_(p)
            v.zero_()
            t.zero_()
            a.zero_()


def reference_step(params: Params, grads, **kw):
    return params.step(grads, backend=reference, **kw)


def functional_step(params: Params, grads, lr=0.05, momentum=0.2, lam=0.5):
    """A step through rmda_fused.functional with backend='triton': validated, and split
    between the kernels and the reference backend as the optimizer's steps are."""
    import warnings

    from rmda_fused.functional import rmda_step

    with warnings.catch_warnings():  # the fallback warning is the functional core's to test
        warnings.simplefilter("ignore", RuntimeWarning)
        rmda_step(params.p, list(grads), params.w0, params.v, params.t, params.a, params.m,
                  lr=lr, momentum=momentum, lam=lam, grouping=params.grouping,
                  backend="triton")


def spy_on_triton(monkeypatch) -> list[StepBatch]:
    """The batches the triton backend receives from now on (it still runs them)."""
    received = []
    step = triton_backend.rmda_step_

    def spy(batch, options):
        received.append(batch)
        return step(batch, options)

    monkeypatch.setattr(triton_backend, "rmda_step_", spy)
    return received


class Float64:
    """docs/algorithm.md, "The update", in float64, one tensor at a time; W rounded to the
    parameter dtype per write."""

    def __init__(self, params: Params):
        self.grouping = params.grouping
        self.dtypes = [p.dtype for p in params.p]
        self.W = [p.detach().cpu().double().clone() for p in params.p]
        self.W0 = [w.clone() for w in self.W]
        self.V = [torch.zeros_like(w) for w in self.W]
        self.t = [0] * len(self.W)
        self.A = [0.0] * len(self.W)
        self.zero = [None] * len(self.W)
        self.margin = [None] * len(self.W)

    def _groups(self, z):  # rows of the returned view are the groups
        if self.grouping == "input_channel":
            size = z.numel() // z.shape[1] if z.shape[1] else 0
            return z.transpose(0, 1).reshape(z.shape[1], size)
        if self.grouping == "output_channel":
            size = z.numel() // z.shape[0] if z.shape[0] else 0
            return z.reshape(z.shape[0], size)
        return z.reshape(-1, 1)  # elementwise: L1

    def step(self, grads, lr=0.05, momentum=0.2, lam=0.5, grad_scale=1.0):
        for i, g in enumerate(grads):
            g = g.detach().cpu().double() / grad_scale
            self.t[i] += 1
            beta = math.sqrt(self.t[i])
            s = lr * beta
            self.A[i] += s
            self.V[i] = self.V[i] + s * g
            z = self.W0[i] - self.V[i] / beta
            if self.grouping != "none":
                tau = lam * self.A[i] / beta
                rows = self._groups(z)
                n = rows.norm(dim=1) if rows.shape[1] else torch.zeros(rows.shape[0],
                                                                      dtype=torch.float64)
                thr = tau * math.sqrt(rows.shape[1])
                keep = n > thr
                scale = torch.where(keep, (n - thr) / torch.where(keep, n, 1.0), 0.0)
                z = (self._groups(z) * scale[:, None])
                if self.grouping == "input_channel":
                    shape = self.W[i].shape
                    z = z.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
                z = z.reshape(self.W[i].shape)
                self.zero[i] = ~keep
                self.margin[i] = (n - thr) / max(thr, 1e-30)
            w = (1 - momentum) * self.W[i] + momentum * z
            self.W[i] = w.to(self.dtypes[i]).double()

    def restart(self):
        self.W0 = [w.clone() for w in self.W]
        self.V = [torch.zeros_like(w) for w in self.W]
        self.t = [0] * len(self.W)
        self.A = [0.0] * len(self.W)


def grads_for(params: Params, gen, lam=0.5, scale=1.0):
    """Gradients with a per-group bias so that some groups end zero and others do not."""
    out = []
    for p in params.p:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() >= 2 and p.shape[1] > 0:
            bias = torch.linspace(-2.0, 2.0, p.shape[1], dtype=torch.float64) * lam
            g += bias.reshape(1, -1, *([1] * (p.dim() - 2)))
        if p.dim() >= 2 and p.shape[1] > 1:
            g[:, 1] = 0.0  # with a zero channel of W0 this group stays exactly zero
        out.append((g * scale).to(device=p.device, dtype=p.dtype))
    return out


def check_close(params: Params, ref: Float64, tol: float, what=""):
    for i, (p, v) in enumerate(zip(params.p, params.v)):
        if p.numel() == 0:
            continue
        w64 = ref.W[i]
        scale = max(float(w64.abs().max()), 1e-3)
        err = float((p.detach().cpu().double() - w64).abs().max()) / scale
        assert err <= tol, f"{what} W of tensor {i} {tuple(p.shape)}: rel err {err:.3g} > {tol}"
        vscale = max(float(ref.V[i].abs().max()), 1e-3)
        verr = float((v.cpu().double() - ref.V[i]).abs().max()) / vscale
        assert verr <= tol, f"{what} V of tensor {i} {tuple(p.shape)}: rel err {verr:.3g}"
    for i, (t, a) in enumerate(zip(params.t, params.a)):
        assert float(t) == ref.t[i], f"{what} t of tensor {i}"
        assert abs(float(a) - ref.A[i]) <= tol * max(ref.A[i], 1.0), f"{what} A of tensor {i}"
    for i, m in enumerate(params.m):
        if m is None or ref.zero[i] is None:
            continue
        clear = ref.margin[i].abs() > 1e-4  # groups right at the threshold may round either way
        got, want = m.cpu()[clear], ref.zero[i][clear]
        assert torch.equal(got, want), f"{what} zero mask of tensor {i} {tuple(params.p[i].shape)}"
