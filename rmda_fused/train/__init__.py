"""ImageNet-scale training with RMDA (single process or torchrun/DDP): see :mod:`.cli`.

``python -m rmda_fused.train --data /imagenet`` (or the ``rmda-train`` console script);
``run(argv)`` does the same from Python and returns the final metrics.
"""
from .cli import main, run

__all__ = ["main", "run"]
