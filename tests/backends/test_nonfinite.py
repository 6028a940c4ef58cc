"""The default check of gradients for NaN/inf (rmda_fused.functional.nonfinite_flag): the C++
extension's read-only op on CPU and CUDA (csrc/nonfinite_cpu.cpp, nonfinite_cuda.cu) and
the torch-ops fallback used without the extension. Any NaN or infinity, in any float
dtype, anywhere in any tensor of the list, gives 1; finite tensors give 0; the tensors are
never changed."""
from __future__ import annotations

import pytest
import torch

import rmda_fused
from rmda_fused import functional

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(3,), (64, 33, 3, 3), (0, 4), (5000,), (70000,)]
# (tensor, flat index): first and last entries, chunk edges of both kernels, a tail
PLACES = [(0, 2), (1, -1), (3, 4095), (3, 4096), (4, 65535), (4, 65536), (4, 69999)]


def _op_or_skip(device):
    reason = rmda_fused.available_backends()[device]
    if reason is not None:
        pytest.skip(f"the {device} extension is unavailable: {reason}")


def _tensors(dtype, device):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES]


def _flag(check, tensors):
    before = [t.clone() for t in tensors]
    flag = check(tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(t.nan_to_num(), b.nan_to_num())
    return float(flag)


def _op(tensors):
    flag = torch.zeros((), device=tensors[0].device)
    torch.ops.rmda_fused.nonfinite_(tensors, flag)
    return flag


def _fallback(tensors):
    return functional._nonfinite_without_extension(
        tensors, torch.zeros((), device=tensors[0].device))


CHECKS = {"extension": _op, "fallback": _fallback, "nonfinite_flag": functional.nonfinite_flag}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_tensors_give_zero(dtype, device, check):
    if check != "fallback":
        _op_or_skip(device)
    tensors = _tensors(dtype, device)
    tensors[3][7] = torch.finfo(dtype).max if check != "fallback" or dtype != torch.float64 \
        else 1e30  # the fallback's fp32 sums count an fp64 sum beyond fp32's range
    assert _flag(CHECKS[check], tensors) == 0.0


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("place", PLACES)
def test_any_nonfinite_entry_gives_one(dtype, device, check, bad, place):
    if check != "fallback":
        _op_or_skip(device)
    tensors = _tensors(dtype, device)
    tensor, index = place
    tensors[tensor].view(-1)[index] = bad
    assert _flag(CHECKS[check], tensors) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_permuted_and_strided_tensors_are_read_whole(device):
    _op_or_skip(device)
    base = torch.randn(8, 6, 5, 5, device=device)
    channels_last = base.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(10, 20, device=device)[:, ::2]
    assert _flag(_op, [channels_last, strided]) == 0.0
    strided[9, 9] = float("nan")
    assert _flag(_op, [channels_last, strided]) == 1.0
    channels_last[7, 5, 4, 4] = float("inf")
    assert _flag(_op, [channels_last]) == 1.0
