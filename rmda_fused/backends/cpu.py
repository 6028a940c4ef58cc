"""C++ CPU backend: the fused, multi-tensor RMDA step of csrc/rmda_cpu.cpp.

One pass over memory per parameter (24 B/elem for fp32; see the header of rmda_cpu.cpp for
the strided input_channel case), group norms and the zero_groups mask in the same kernel,
threads over tiles of all tensors at once.
"""
from __future__ import annotations

import torch

from . import _cpp_common
from ._cpp_common import rmda_step_  # noqa: F401  (the module contract of functional.py)


def unavailable_reason() -> str | None:
    return _cpp_common.unavailable_reason("cpu")


def handles(device: torch.device) -> bool:
    return device.type == "cpu"
