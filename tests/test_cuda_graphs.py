"""A whole RMDA step captured in a CUDA graph and replayed, on the fused CUDA backend: the
same parameters and state as the same steps run eagerly. Needs a CUDA device."""
from __future__ import annotations

import pytest
import torch

import rmda_fused

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(rmda_fused.available_backends()["cuda"] is not None,
                       reason=f"cuda backend: {rmda_fused.available_backends()['cuda']}"),
]

SHAPES = [(16, 8, 3, 3), (16,), (32, 16, 1, 1), (10, 32), (10,)]


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).cuda() for s in SHAPES]


def _optimizer(params, backend):
    # a tensor lr on the device: the kernels read it there, so a replay sees its changes
    weights = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return rmda_fused.RMDA([dict(params=weights), dict(params=rest, lam=0.0)],
                           lr=torch.tensor(0.05, device="cuda"), lam=0.05, backend=backend)


@pytest.mark.parametrize("backend", ["cuda"])
def test_captured_step_replays_as_eager_steps(backend):
    eager_params, graph_params = _params(0), _params(0)
    eager, captured = _optimizer(eager_params, backend), _optimizer(graph_params, backend)
    static_grads = _grads(0)
    for p, g in zip(graph_params, static_grads):
        p.grad = g
    # warm up on a side stream (builds the step plan and the state), as torch's docs do
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        captured.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, g in zip(eager_params, _grads(0)):
        p.grad = g
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    for k in range(1, 6):
        grads = _grads(k)
        for g, new in zip(static_grads, grads):
            g.copy_(new)
        for p, g in zip(eager_params, grads):
            p.grad = g
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(graph_params, eager_params):
        assert torch.equal(p, q)
        for key in ("dual", "step", "alpha"):
            assert torch.equal(captured.state[p][key], eager.state[q][key])
