"""Kernel tests run compiled on a GPU, or in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported (triton.jit decides at
decoration time), so it is set here, at collection, when no CUDA device is present.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # kernel_testing

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    from rmda_fused.backends import triton as backend

    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    return "cpu" if backend._kernels.interpreted() else "cuda"
