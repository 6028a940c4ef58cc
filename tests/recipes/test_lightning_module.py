"""PyTorch Lightning: configure_optimizers returns RMDA and its MultiStepRestart schedule."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmda_fused

L = pytest.importorskip("lightning", reason="the recipe is for Lightning's Trainer (extra 'recipes')")

BATCHES_PER_EPOCH = 2


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = rmda_fused.RMDA(rmda_fused.param_groups(self, lam=0.5), lr=1.0, momentum=0.1)
        scheduler = rmda_fused.MultiStepRestart(optimizer, milestones=[1])  # stepped each epoch
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def test_lightning_steps_rmda_and_restarts_it(watch):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4 * BATCHES_PER_EPOCH, 3, 8, 8),
                         torch.arange(4 * BATCHES_PER_EPOCH) % 3)
    model = Classifier()
    watched = watch(model)
    trainer = L.Trainer(max_steps=2 * BATCHES_PER_EPOCH, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=4))
    (optimizer,) = trainer.optimizers
    # the restart at the end of epoch 1 set t back to 0: epoch 2 took t to 2 again
    watched.assert_rmda_trained(optimizer, BATCHES_PER_EPOCH)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1] * 3)
