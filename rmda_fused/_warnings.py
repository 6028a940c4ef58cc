"""Warnings that point at the caller's line, not into rmda_fused or torch.optim."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside rmda_fused and torch (an
    optimizer's step is reached through torch's hooks, so a fixed stacklevel misses)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level + 1)
