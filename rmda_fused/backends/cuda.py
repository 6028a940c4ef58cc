"""CUDA backend: the fused, multi-tensor RMDA step of csrc/rmda_cuda.cu,
and the two kernel phases of a coupled-group step (csrc/coupled_cuda.cu).

Launches per step: per chunk of up to ``kMaxTensors`` (128) tensors of one dtype, one for
the t/A update and one for the elements; no host synchronisation (lr, grad_scale and
found_inf are read on the device), so a step can be captured in a CUDA graph when lr is a
device tensor.
"""
from __future__ import annotations

import torch

from . import _cpp_common
# the module contract of functional.py and of the coupled step (rmda_fused/coupled.py)
from ._cpp_common import (  # noqa: F401
    planned_step, rmda_apply_, rmda_partials_, rmda_step_, run_planned,
)


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _cpp_common.unavailable_reason("cuda")


def handles(device: torch.device) -> bool:
    return device.type == "cuda"
