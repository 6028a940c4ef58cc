"""rmda_fused.coupling: which columns of which dense weights read one channel, on models
whose coupled sets are written out by hand here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning", reason="coupled groups come from Torch-Pruning's graph")

from rmda_fused.coupling import column_groups  # noqa: E402
from rmda_fused.train.models import digits_cnn  # noqa: E402


def partition(model: nn.Module, x: torch.Tensor) -> set[frozenset[tuple[str, int]]]:
    """The coupled groups of ``model`` as sets of (layer name, column)."""
    groups = column_groups(model, x)
    names = {m.weight: name for name, m in model.named_modules() if m in _dense(model)}
    members: dict[int, set[tuple[str, int]]] = {}
    for weight, ids in groups.ids.items():
        assert ids.dtype == torch.int64 and ids.device.type == "cpu"
        assert ids.shape == (weight.shape[1],)
        for column, gid in enumerate(ids.tolist()):
            members.setdefault(gid, set()).add((names[weight], column))
    assert sorted(members) == list(range(groups.num_groups))  # ids are 0..n-1, no gaps
    return {frozenset(m) for m in members.values()}


def _dense(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]


def alone(name: str, columns: int) -> set[frozenset[tuple[str, int]]]:
    return {frozenset({(name, j)}) for j in range(columns)}


def shared(names_and_columns: list[tuple[str, list[int]]]) -> set[frozenset[tuple[str, int]]]:
    """One group per channel k: column names_and_columns[i][1][k] of each layer i."""
    count = len(names_and_columns[0][1])
    return {frozenset((name, cols[k]) for name, cols in names_and_columns) for k in range(count)}


class ResidualBlock(nn.Module):
    """A ResNet BasicBlock with a 1x1 downsampling shortcut between a stem and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = torch.relu(y + self.down(x))
        return self.fc(y.mean(dim=(2, 3)))


def test_a_residual_block_couples_the_readers_of_each_stream():
    groups = partition(ResidualBlock(), torch.randn(1, 3, 8, 8))
    assert groups == (
        alone("stem.0", 3)  # image channels: no layer produces them
        | shared([("conv1", list(range(4))), ("down.0", list(range(4)))])  # the block's input
        | alone("conv2", 6)  # conv1's output, read by conv2 alone
        | alone("fc", 6))  # the sum of conv2's and the shortcut's outputs, read by fc alone


def test_resnet18_residual_stream_is_one_group_per_channel():
    torchvision = pytest.importorskip("torchvision", reason="the model comes from torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    groups = column_groups(model, torch.randn(1, 3, 32, 32))
    readers = [model.layer1[0].conv1, model.layer1[1].conv1, model.layer2[0].conv1,
               model.layer2[0].downsample[0]]  # layer1's stream, 64 channels
    for k in range(64):
        assert len({int(groups.ids[m.weight][k]) for m in readers}) == 1
    assert len(groups.ids[model.layer1[0].conv1.weight].unique()) == 64
    # the stem's image channels are not channels of a coupled set
    assert not groups.coupled[groups.ids[model.conv1.weight]].any()
    assert groups.coupled[groups.ids[model.fc.weight]].all()
    # per stage, its stream (the stem's output joins layer1's) and the two blocks' inner
    # channels: 2,883 groups where input-channel groups are 4,355 columns
    assert groups.num_groups == 3 + 3 * (64 + 128 + 256 + 512)


class TwoBranches(nn.Module):
    """torch.cat of two branches, one of which is also read directly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 1)
        self.a, self.b = nn.Conv2d(5, 2, 3, padding=1), nn.Conv2d(5, 3, 3, padding=1)
        self.after_cat = nn.Conv2d(5, 4, 1)
        self.after_a = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        y = self.after_cat(torch.cat([a, b], dim=1)) + self.after_a(a)
        return self.fc(y.mean(dim=(2, 3)))


def test_a_concatenation_maps_each_branch_to_its_columns():
    groups = partition(TwoBranches(), torch.randn(1, 3, 6, 6))
    assert groups == (
        alone("stem", 3)
        | shared([("a", list(range(5))), ("b", list(range(5)))])  # stem's output
        | shared([("after_cat", [0, 1]), ("after_a", [0, 1])])  # branch a, read twice
        | shared([("after_cat", [2, 3, 4])])  # branch b, columns 2-4 of after_cat
        | alone("fc", 4))


def test_flatten_to_linear_gives_the_columns_of_one_channel_one_id():
    model = digits_cnn()  # conv2: 64 channels of 2x2 -> flatten -> linear(256)
    groups = partition(model, torch.randn(1, 1, 8, 8))
    assert groups == (
        alone("0", 1) | alone("3", 32)
        | {frozenset(("7", 4 * c + i) for i in range(4)) for c in range(64)})


def test_a_plain_chain_gives_the_input_channel_groups():
    chain = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    groups = partition(chain, torch.randn(1, 3, 9, 9))
    assert groups == alone("0", 3) | alone("3", 8) | alone("6", 6) | alone("10", 5)


def test_mobilenet_v3_couples_through_depthwise_convs_and_squeeze_excitation():
    torchvision = pytest.importorskip("torchvision", reason="the model comes from torchvision")
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    groups = column_groups(model, torch.randn(1, 3, 32, 32))
    ids = {name: groups.ids[m.weight] for name, m in model.named_modules() if m in _dense(model)}
    # block 1 (no expansion): the stem's channels pass a depthwise conv, then feed the SE
    # gate (fc1) and, multiplied by it, the projection: one group per channel
    assert torch.equal(ids["features.1.block.1.fc1"], ids["features.1.block.2.0"])
    # block 4: the expansion's channels likewise, through a 5x5 depthwise conv
    assert torch.equal(ids["features.4.block.2.fc1"], ids["features.4.block.3.0"])
    assert len(ids["features.4.block.3.0"].unique()) == 96
    # fc1's outputs are read by fc2 alone
    fc2 = ids["features.4.block.2.fc2"]
    assert len(fc2.unique()) == 24 and not torch.isin(fc2, torch.cat(
        [v for k, v in ids.items() if k != "features.4.block.2.fc2"])).any()
    assert groups.coupled.sum() == groups.num_groups - 3  # all but the image channels


class MixesChannels(nn.Module):
    """A LayerNorm over channels and a grouped conv: sets through them are not coupled."""

    def __init__(self):
        super().__init__()
        self.first, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)
        self.second, self.third = nn.Linear(6, 6), nn.Linear(6, 2)
        self.conv = nn.Conv2d(2, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)
        self.reader, self.other = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)

    def forward(self, x):  # (N, 4)
        h = self.third(self.second(self.norm(self.first(x))))
        c = self.conv(h[:, :, None, None])
        return self.reader(self.grouped(c)).sum() + self.other(c).sum()


def test_sets_through_layers_that_mix_channels_are_not_coupled():
    model = MixesChannels()
    groups = column_groups(model, torch.randn(2, 4))
    coupled = {name: bool(groups.coupled[groups.ids[m.weight]].any())
               for name, m in model.named_modules() if m in _dense(model)}
    # first -> LayerNorm -> second: not coupled; second -> third: a plain pair, coupled;
    # conv's output is read by a grouped conv and by other: not coupled; nor is the
    # grouped conv's output, which reader reads
    assert coupled == dict(first=False, second=False, third=True, conv=True, reader=False,
                           other=False)


def test_a_layer_run_twice_is_in_no_coupled_set():
    twice = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), twice, nn.ReLU(), twice, nn.Linear(4, 2))
    groups = column_groups(model, torch.randn(2, 3))
    # twice's columns read two activations; model[4] reads twice's output
    assert not groups.coupled[groups.ids[twice.weight]].any()
    assert not groups.coupled[groups.ids[model[4].weight]].any()


def test_tracing_keeps_each_modules_training_flag():
    model = ResidualBlock().train()
    model.stem[1].eval()
    column_groups(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.conv1.training and not model.stem[1].training
