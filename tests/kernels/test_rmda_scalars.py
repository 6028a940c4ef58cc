"""kernels/rmda_scalars.py: the scalar step as a launch of its own (rmda_scalars_, which
other kernels launch before reading the scratch table), against float64, and against the
scalars that the element kernels derive themselves (the same t and A, bit for bit)."""
from __future__ import annotations

import math

import pytest
import torch

from kernel_testing import Params, grads_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalars_launch_matches_float64_and_the_fused_step(device, dtype):
    from rmda_fused.kernels import _common, rmda_scalars_

    shapes = [(6, 4, 3, 3), (10,), (0,)]
    fused = Params(shapes, "none", dtype=dtype, device=device)
    alone = fused.clone()
    batch = alone.batch([torch.zeros_like(p) for p in alone.p])
    meta = _common.meta_table(batch, [(p.numel(),) for p in alone.p], torch.device(device))
    scratch = torch.full((len(shapes), _common.NSCR.value), float("nan"), dtype=dtype,
                         device=device)
    hyper = _common.Hyper(torch.device(device))
    gen = torch.Generator().manual_seed(13)
    t, alpha = 0, 0.0
    lam, scale = 0.3, 64.0
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for k in range(5):
        lr = 0.05 / (k + 1)
        skipped = k == 2
        found_inf = torch.tensor(float(skipped), device=device)
        grad_scale = torch.tensor(scale, device=device)
        rmda_scalars_(meta, scratch, len(shapes), hyper.update(lr, 0.2, lam), None,
                      grad_scale, found_inf)
        fused.step([g * scale for g in grads_for(fused, gen)], lr=lr, momentum=0.2, lam=lam,
                   grad_scale=grad_scale, found_inf=found_inf)
        beta = math.sqrt(t + 1)
        want = dict(beta=beta, weight=lr * beta / scale, tau=lam * (alpha + lr * beta) / beta)
        if not skipped:
            t, alpha = t + 1, alpha + lr * beta
        for row in scratch.cpu().double().tolist():
            got = dict(beta=row[_common.SCR_BETA], weight=row[_common.SCR_GRAD_WEIGHT],
                       tau=row[_common.SCR_TAU])
            for key, value in want.items():
                assert abs(got[key] - value) <= tol * abs(value), (k, key, got[key], value)
            assert row[_common.SCR_SKIP] == float(skipped)
        for i in range(len(shapes)):
            assert float(alone.t[i]) == t and abs(float(alone.a[i]) - alpha) <= tol * alpha
            assert torch.equal(alone.t[i], fused.t[i]) and torch.equal(alone.a[i], fused.a[i])
