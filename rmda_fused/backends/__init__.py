"""RMDA step implementations, one module per backend; chosen in :mod:`rmda_fused.functional`."""
from __future__ import annotations

import torch
from torch import Tensor


def split_lr(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """(host value, device tensor) of a fused kernel's lr.

    A tensor lr on the parameters' device is read by the kernel itself: no host sync, and no
    recompilation when a scheduler changes it. Any other lr becomes a float (reading a CPU
    tensor needs no device sync).
    """
    if isinstance(lr, Tensor) and lr.device == device:
        return 0.0, lr.detach().reshape(())
    return float(lr), None
