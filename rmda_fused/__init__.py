"""rmda-fused: RMDA (Huang & Lee, ICLR 2022) as a fused, structured-sparsity optimizer."""
from . import functional, grouping, structure
from .functional import available_backends
from .optimizer import RMDA
from .param_groups import param_groups
from .proxsgd import ProxSGD
from .scheduler import MultiStepRestart
from .structure import IdentificationTracker

__all__ = [
    "RMDA",
    "MultiStepRestart",
    "ProxSGD",
    "IdentificationTracker",
    "available_backends",
    "param_groups",
    "functional",
    "grouping",
    "structure",
]
__version__ = "0.1.0"
