"""C++ CPU backend: the fused, multi-tensor RMDA step of csrc/rmda_cpu.cpp,
and the two kernel phases of a coupled-group step (csrc/coupled_cpu.cpp).

Group norms and the zero mask come from the same kernel as the update; threads share tiles
of all tensors at once. Memory traffic per grouping: docs/algorithm.md, "Memory traffic".
"""
from __future__ import annotations

import torch

from . import _cpp_common
# the module contract of functional.py and of the coupled step (rmda_fused/coupled.py)
from ._cpp_common import (  # noqa: F401
    planned_step, rmda_apply_, rmda_partials_, rmda_step_, run_planned,
)


def unavailable_reason() -> str | None:
    return _cpp_common.unavailable_reason("cpu")


def handles(device: torch.device) -> bool:
    return device.type == "cpu"
