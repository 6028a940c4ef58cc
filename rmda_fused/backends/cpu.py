"""C++ CPU backend: the fused, multi-tensor RMDA step of csrc/rmda_cpu.cpp.

Group norms and the zero mask come from the same kernel as the update; threads share tiles
of all tensors at once. Memory traffic per grouping: docs/algorithm.md, "Memory traffic".
"""
from __future__ import annotations

import torch

from . import _cpp_common
from ._cpp_common import rmda_step_  # noqa: F401  (the module contract of functional.py)


def unavailable_reason() -> str | None:
    return _cpp_common.unavailable_reason("cpu")


def handles(device: torch.device) -> bool:
    return device.type == "cpu"
