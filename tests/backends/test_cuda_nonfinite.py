"""The CUDA extension's read-only check of gradients (csrc/nonfinite_cuda.cu): any NaN or
infinity, in any float dtype, anywhere in any tensor of the list, sets found_inf to 1;
finite tensors leave it at 0; the tensors are never written. Needs CUDA."""
from __future__ import annotations

import pytest
import torch

import rmda_fused

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(rmda_fused.available_backends()["cuda"] is not None,
                       reason=f"cuda backend: {rmda_fused.available_backends()['cuda']}"),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _tensors(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (64, 33, 3, 3), (0, 4), (5000,), (1000, 2048)]
    return [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]


def _check(tensors):
    flag = torch.zeros((), device="cuda")
    before = [t.clone() for t in tensors]
    torch.ops.rmda_fused.nonfinite_(tensors, flag)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b) or (t.isnan() == b.isnan()).all()
    return float(flag)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_tensors_leave_found_inf_at_zero(dtype):
    tensors = _tensors(dtype)
    tensors[3][7] = torch.finfo(dtype).max  # large but finite
    assert _check(tensors) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 2), (1, -1), (3, 4095), (3, 4096), (4, 2047999)])
def test_any_nonfinite_entry_sets_found_inf(dtype, bad, where):
    tensors = _tensors(dtype)
    tensor, index = where
    tensors[tensor].view(-1)[index] = bad
    assert _check(tensors) == 1.0


def test_permuted_and_strided_tensors_are_read_whole():
    base = torch.randn(8, 6, 5, 5, device="cuda")
    channels_last = base.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(10, 20, device="cuda")[:, ::2]
    assert _check([channels_last, strided]) == 0.0
    strided[9, 9] = float("nan")
    assert _check([channels_last, strided]) == 1.0
    channels_last[7, 5, 4, 4] = float("inf")
    assert _check([channels_last]) == 1.0
