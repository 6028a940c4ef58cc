"""The CUDA kernel's banded grouped mode at its edges: groups that just fit a block's buffer
(12,278 fp32 / 6,134 fp64 entries with their shrink value and partial norms) and just do not
(they run one block per group), bands that do not divide the group count, 1x1 convs, and empty views,
against the float64 statement of the update in tests/float64_reference.py. Needs CUDA."""
from __future__ import annotations

import pytest
import torch

import rmda_fused
from float64_reference import Float64RMDA

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(rmda_fused.available_backends()["cuda"] is not None,
                       reason=f"cuda backend: {rmda_fused.available_backends()['cuda']}"),
]

# (shape, grouping): input-channel groups hold shape[0] * prod(shape[2:]) entries
EDGES = [
    ((12278, 3), "input_channel"),           # fp32: one group fills the buffer
    ((12279, 2), "input_channel"),           # fp32: one entry too many -> a block per group
    ((6134, 3), "input_channel"),            # fp64's edge
    ((6135, 2), "input_channel"),
    ((1500, 7), "input_channel"),            # 7 groups per band: 8 warps share their norms
    ((2048, 512, 1, 1), "input_channel"),    # 5 groups per band: 512 % 5 != 0
    ((7, 13, 3, 3), "input_channel"),
    ((13, 7, 5, 5), "output_channel"),
    ((0, 4, 3, 3), "input_channel"),
    ((4, 0), "output_channel"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,grouping", EDGES)
def test_band_edges_match_float64(shape, grouping, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    # every other group ten times smaller: lam zeroes those and keeps the rest
    dim = 1 if grouping == "input_channel" else 0
    scale = torch.ones(shape[dim], dtype=torch.float64)
    scale[::2] = 0.1
    scale = scale.reshape([-1 if d == dim else 1 for d in range(len(shape))])
    w = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    grads = [0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) * scale
             for _ in range(6)]
    lr, c, lam = 0.05, 0.2, 0.2
    p = torch.nn.Parameter(w.to("cuda", dtype))
    opt = rmda_fused.RMDA([p], lr=lr, momentum=c, lam=lam, grouping=grouping, backend="cuda")
    ref = Float64RMDA([dict(params=[p.detach().cpu()], lr=lr, momentum=c, lam=lam,
                            grouping=grouping)])
    for g in grads:
        p.grad = g.to("cuda", dtype)
        opt.step()
        ref.step([g])
    want = ref.states[0].W
    got = p.detach().cpu().double()
    assert got.shape == want.shape
    if want.numel():
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1e-30)
        zeroed = ref.states[0].zero
        assert 0 < int(zeroed.sum()) < zeroed.numel() or zeroed.numel() < 2
