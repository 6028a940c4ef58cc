"""CUDA backend: the fused, multi-tensor RMDA step of csrc/rmda_cuda.cu.

Launches per step: per chunk of up to ``kMaxTensors`` (128) tensors of one dtype, one for
the t/A update and one for the elements; no host synchronisation (lr, grad_scale and
found_inf are read on the device), so a step can be captured in a CUDA graph when lr is a
device tensor.
"""
from __future__ import annotations

import torch

from . import _cpp_common
from ._cpp_common import rmda_step_  # noqa: F401  (the module contract of functional.py)


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _cpp_common.unavailable_reason("cuda")


def handles(device: torch.device) -> bool:
    return device.type == "cuda"
