"""``--fsdp``: FSDP2 (``fully_shard``) instead of DDP.

Which modules become FSDP units: every child that holds parameters of each top-level
``nn.Sequential`` of the model (a torchvision ResNet's BasicBlock/Bottleneck in
layer1..layer4, a VGG/AlexNet/MobileNet layer in ``features``; for a model that is itself a
Sequential, such as the digits CNN, its own children), then the root, which takes what is
left (a ResNet's stem conv, bn1 and fc). All units share one 1-D device mesh
over every process: RMDA reduces a param group's cut groups over one mesh
(:mod:`rmda_fused.sharding`). With a single process the mesh has one rank (a one-process
gloo/NCCL group is created for it), so a sharded checkpoint can be resumed by one process.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .distributed import Dist


def units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard` wraps before the root, in order."""
    stages = [model] if isinstance(model, nn.Sequential) else \
        [stage for stage in model.children() if isinstance(stage, nn.Sequential)]
    return [block for stage in stages for block in stage.children()
            if any(True for _ in block.parameters())]


def shard(model: nn.Module, info: Dist, groups: list[dict[str, Any]] | None):
    """Wrap ``model`` with ``fully_shard`` in place; returns ``groups`` (param groups built
    on the unwrapped model, e.g. coupled ones traced on it) holding the sharded parameters
    that replaced its own (same names)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if groups is None:
        return None
    sharded = dict(model.named_parameters())
    return [{**g, "params": [sharded[names[id(p)]] for p in g["params"]]} for g in groups]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on rank 0, on the CPU (the other ranks get an empty dict);
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
