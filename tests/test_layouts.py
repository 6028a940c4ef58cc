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


needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (device guard)")


@needs_two_gpus
def test_parameters_on_a_device_that_is_not_current(backend):
    """Params on cuda:1 while cuda:0 is current: each backend launches on cuda:1's stream."""
    if backend == "cpu":
        pytest.skip("the cpu backend takes CPU tensors only")
    params = [torch.nn.Parameter(torch.randn(6, 4, 3, 3, device="cuda:1"))]
    expected = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    opt = rmda_fused.RMDA(params, lr=0.1, lam=0.3, backend=backend)
    ref = rmda_fused.RMDA(expected, lr=0.1, lam=0.3, backend="reference")
    with torch.cuda.device(0):
        for _ in range(3):
            g = torch.randn(6, 4, 3, 3)
            params[0].grad, expected[0].grad = g.to("cuda:1"), g
            opt.step()
            ref.step()
    torch.testing.assert_close(params[0].detach().cpu(), expected[0].detach(),
                               rtol=1e-5, atol=1e-6)


def test_amp_scalars_on_another_device_than_the_parameters(backend, device):
    """A GradScaler may keep grad_scale/found_inf elsewhere: every backend moves them."""
    other = "cpu" if device != "cpu" else ("cuda" if torch.cuda.is_available() else None)
    if other is None:
        pytest.skip("needs a second device type (no CUDA device)")
    p = torch.nn.Parameter(torch.randn(4, 3, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    opt = rmda_fused.RMDA([p], lr=0.1, backend=backend)
    ref = rmda_fused.RMDA([q], lr=0.1, backend=backend)
    g = torch.randn(4, 3, device=device)
    p.grad, q.grad = g * 8.0, g.clone()
    opt.grad_scale = torch.tensor(8.0, device=other)
    opt.found_inf = torch.tensor(0.0, device=other)
    opt.step()
    ref.step()
    torch.testing.assert_close(p, q)
