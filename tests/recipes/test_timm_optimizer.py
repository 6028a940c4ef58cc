"""timm's create_optimizer_v2 building RMDA from timm's optimizer registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rmda_fused

timm = pytest.importorskip("timm", reason="the recipe is for timm's optimizer factory (extra 'recipes')")
from timm.optim import OptimInfo, create_optimizer_v2  # noqa: E402
# the registry create_optimizer_v2 reads; timm exports no function to register into it
from timm.optim._optim_factory import default_registry  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def rmda_registered():
    # has_momentum: timm passes its momentum argument (RMDA's c); has_eps: it has no eps
    default_registry.register(OptimInfo(name="rmda", opt_class=rmda_fused.RMDA,
                                        has_eps=False, has_momentum=True))


def test_create_optimizer_v2_builds_rmda_with_param_groups(watch):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)  # has depthwise convs
    watched = watch(model)
    optimizer = create_optimizer_v2(model, "rmda", lr=0.1, momentum=0.1,
                                    param_group_fn=lambda m: rmda_fused.param_groups(m, lam=0.5))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    watched.assert_rmda_trained(optimizer, STEPS)
    depthwise = model.blocks[3][0].conv_dw
    assert depthwise.groups == depthwise.out_channels > 1
    # timm passes weight_decay=0 (its default) and momentum; c stays as given, not timm's 0.9
    assert [(g["grouping"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("input_channel", 0.1, 0.0), ("output_channel", 0.1, 0.0), ("none", 0.1, 0.0)]
    assert any(p is depthwise.weight for p in optimizer.param_groups[1]["params"])
