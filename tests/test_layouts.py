"""Memory layouts: channels_last conv weights run in the fused kernels (over the memory-order
group view) and agree with the float64 reference, in every backend."""
from __future__ import annotations

import warnings

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA
from helpers import compare


@pytest.mark.parametrize("grouping", ["input_channel", "output_channel", "none"])
def test_channels_last_weights_match_the_reference_without_fallback(backend, device, grouping):
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4, 3, 3), (5, 6, 1, 1), (3, 5, 2, 3)]
    params = [torch.nn.Parameter((0.5 * torch.randn(s, generator=gen)).to(device).contiguous(
        memory_format=torch.channels_last)) for s in shapes]
    opt = rmda_fused.RMDA(params, lr=0.05, momentum=0.2, lam=0.4, grouping=grouping,
                          backend=backend)
    ref = Float64RMDA([dict(params=params, lr=0.05, momentum=0.2, lam=0.4, grouping=grouping)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to 'reference'
        for _ in range(12):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g.to(device).contiguous(memory_format=torch.channels_last)
            opt.step()
            ref.step(grads)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
    compare(opt, params, ref)
