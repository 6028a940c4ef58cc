"""What every recipe checks after training: the framework stepped RMDA itself, and the
group LASSO acted on the groups ``rmda_fused.param_groups`` chose."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rmda_fused
from rmda_fused.structure import group_sparsity

DUAL_AVERAGING_KEYS = {"initial", "dual", "step", "alpha"}


class TrainingWatch:
    """Copies a model's trainable parameters when made, to check after training."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def assert_rmda_trained(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        """``optimizer`` is an RMDA that took ``steps`` steps on every trainable parameter,
        moved the model and zeroed some groups of z."""
        assert type(optimizer) is rmda_fused.RMDA
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                assert DUAL_AVERAGING_KEYS <= optimizer.state[p].keys(), name
                assert int(optimizer.state[p]["step"]) == steps, name
        assert any(not torch.equal(p.detach(), self.before[n])
                   for n, p in self.model.named_parameters() if p.requires_grad), "nothing moved"
        assert group_sparsity(optimizer).fraction > 0, "lam zeroed no group of z"


@pytest.fixture
def watch() -> type[TrainingWatch]:
    """``watch(model)`` before training; ``.assert_rmda_trained(optimizer, steps)`` after."""
    return TrainingWatch
