"""rmda_fused.param_groups: conv/linear weights regularized (grouped and depthwise convs one
group per filter), everything else not, each param once."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import rmda_fused
from rmda_fused.grouping import num_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pointwise = nn.Conv2d(4, 4, 1, bias=False)
        self.conv1d = nn.Conv1d(4, 2, 3)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.shared = nn.Linear(5, 5)
        self.twice = nn.Sequential(self.shared, nn.ReLU(), self.shared)  # the same module twice
        self.emb = nn.Embedding(7, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))  # a bare parameter of the model itself

    def forward(self, x):  # (N, 3, 6, 6)
        h = self.pointwise(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = self.conv1d(h.unsqueeze(-1).expand(-1, -1, 3)).mean()
        y = self.twice(self.ln(self.fc(torch.full((1, 4), 1.0) * h)))
        return self.scale * (y.sum() + self.emb.weight.sum() + self.frozen(y).sum())


def ids(params):
    return [id(p) for p in params]


def test_split_and_options():
    net = Net()
    groups = rmda_fused.param_groups(net, lam=1e-3, lr=0.3, momentum=0.2)
    assert len(groups) == 2
    reg, plain = groups
    expected_reg = [net.conv.weight, net.pointwise.weight, net.conv1d.weight, net.fc.weight,
                    net.shared.weight]
    expected_plain = [net.conv.bias, net.bn.weight, net.bn.bias, net.conv1d.bias, net.fc.bias,
                      net.ln.weight, net.ln.bias, net.shared.bias, net.emb.weight, net.scale]
    assert sorted(ids(reg["params"])) == sorted(ids(expected_reg))
    assert sorted(ids(plain["params"])) == sorted(ids(expected_plain))
    assert (reg["lam"], reg["grouping"]) == (1e-3, "input_channel")
    assert (plain["lam"], plain["grouping"]) == (0.0, "none")
    for g in groups:
        assert (g["lr"], g["momentum"]) == (0.3, 0.2)


def test_every_trainable_parameter_exactly_once():
    net = Net()
    net.tied = nn.Linear(5, 7, bias=False)
    net.tied.weight = net.emb.weight  # a tied weight: seen from two modules
    groups = rmda_fused.param_groups(net, lam=0.1)
    all_ids = [i for g in groups for i in ids(g["params"])]
    assert len(all_ids) == len(set(all_ids)), "a shared parameter appears twice"
    trainable = [p for p in net.parameters() if p.requires_grad]  # parameters() deduplicates
    assert sorted(all_ids) == sorted(ids(trainable))
    assert id(net.frozen.weight) not in all_ids and id(net.frozen.bias) not in all_ids


def test_grouping_passes_through_and_is_validated():
    net = Net()
    groups = rmda_fused.param_groups(net, lam=0.1, grouping="output_channel")
    assert groups[0]["grouping"] == "output_channel" and groups[1]["grouping"] == "none"
    with pytest.raises(ValueError, match="'rows'"):
        rmda_fused.param_groups(net, lam=0.1, grouping="rows")


def test_models_with_one_kind_of_parameter():
    norms = nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3))
    groups = rmda_fused.param_groups(norms, lam=0.1)
    assert len(groups) == 1 and groups[0]["grouping"] == "none" and len(groups[0]["params"]) == 4
    weights_only = nn.Linear(3, 2, bias=False)
    groups = rmda_fused.param_groups(weights_only, lam=0.1)
    assert len(groups) == 1 and groups[0]["grouping"] == "input_channel"
    assert rmda_fused.param_groups(nn.ReLU(), lam=0.1) == []


def test_groups_drive_rmda():
    torch.manual_seed(0)
    net = Net()
    opt = rmda_fused.RMDA(rmda_fused.param_groups(net, lam=0.05), lr=0.1, momentum=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 3, 6, 6)).backward()
        opt.step()
    for n, p in net.named_parameters():
        if p.requires_grad:  # every group steps (conv.bias has a zero gradient behind bn)
            assert float(opt.state[p]["step"]) == 3, n
        else:
            assert torch.equal(p.detach(), before[n]) and p not in opt.state
    assert not torch.equal(net.fc.weight.detach(), before["fc.weight"])
    assert not torch.equal(net.ln.bias.detach(), before["ln.bias"])
    # the regularized group keeps masks; biases and norms (grouping 'none') do not
    assert "zero_mask" in opt.state[net.conv.weight]
    assert "zero_mask" not in opt.state[net.conv.bias]
    assert "zero_mask" not in opt.state[net.bn.weight]


class SeparableNet(nn.Module):
    """A MobileNet-style block: dense stem, depthwise conv, grouped pointwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # weight (4, 1, 3, 3)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2, bias=False)  # weight (6, 2, 1, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):  # (N, 3, H, W)
        h = self.grouped(self.bn(self.depthwise(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3))).sum()


def test_grouped_convs_get_one_group_per_filter():
    net = SeparableNet()
    dense, grouped, plain = rmda_fused.param_groups(net, lam=0.1, lr=0.3)
    assert ids(dense["params"]) == ids([net.stem.weight, net.fc.weight])
    assert ids(grouped["params"]) == ids([net.depthwise.weight, net.grouped.weight])
    assert (dense["grouping"], grouped["grouping"], plain["grouping"]) == (
        "input_channel", "output_channel", "none")
    assert (grouped["lam"], grouped["lr"]) == (0.1, 0.3)
    assert num_groups(net.depthwise.weight.shape, grouped["grouping"]) == 4  # one per channel
    assert num_groups(net.grouped.weight.shape, grouped["grouping"]) == 6  # one per filter


@pytest.mark.parametrize("grouping", ["output_channel", "elementwise"])
def test_grouped_convs_share_other_groupings(grouping):
    net = SeparableNet()
    regularized, plain = rmda_fused.param_groups(net, lam=0.1, grouping=grouping)
    assert regularized["grouping"] == grouping
    assert ids(regularized["params"]) == ids(
        [net.stem.weight, net.depthwise.weight, net.grouped.weight, net.fc.weight])


def test_depthwise_channels_are_zeroed_one_by_one():
    net = SeparableNet()
    with torch.no_grad():
        net.depthwise.weight.fill_(1.0)
        net.depthwise.weight[0].fill_(0.01)  # channel 0: norm 0.03, the others 3
    # after one step with a zero gradient and lr=1, z = prox(W, lam): a group (9 entries) is
    # zeroed when its norm is <= 3 * lam, else scaled by 1 - 3 * lam / norm
    lam = 0.1
    opt = rmda_fused.RMDA(rmda_fused.param_groups(net, lam=lam), lr=1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(opt.state[net.depthwise.weight]["zero_mask"].cpu(),
                       torch.tensor([True, False, False, False]))
    z = opt.prox_point(net.depthwise.weight)
    assert not z[0].any()
    torch.testing.assert_close(z[1:], torch.full_like(z[1:], 1.0 - lam))


def test_mobilenet_v3_depthwise_convs_are_grouped_per_channel():
    torchvision = pytest.importorskip("torchvision", reason="the model comes from torchvision")
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    groups = rmda_fused.param_groups(model, lam=0.1)
    grouping_of = {id(p): g["grouping"] for g in groups for p in g["params"]}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    for conv in convs:
        expected = "output_channel" if conv.groups > 1 else "input_channel"
        assert grouping_of[id(conv.weight)] == expected
        assert num_groups(conv.weight.shape, expected) == (
            conv.out_channels if conv.groups > 1 else conv.in_channels)


def _coupled_groups(model, x, **options):
    pytest.importorskip("torch_pruning", reason="coupled groups come from Torch-Pruning's graph")
    return rmda_fused.param_groups(model, lam=0.1, grouping="coupled", example_inputs=x, **options)


def test_coupled_groups_split_and_carry_channel_groups():
    net = SeparableNet()
    dense, grouped, plain = _coupled_groups(net, torch.randn(1, 3, 5, 5), lr=0.3)
    assert ids(dense["params"]) == ids([net.stem.weight, net.fc.weight])
    assert ids(grouped["params"]) == ids([net.depthwise.weight, net.grouped.weight])
    assert (dense["grouping"], grouped["grouping"], plain["grouping"]) == (
        "coupled", "output_channel", "none")
    assert (dense["lam"], grouped["lam"], plain["lam"]) == (0.1, 0.1, 0.0)
    assert all(g["lr"] == 0.3 for g in (dense, grouped, plain))
    assert "channel_groups" not in grouped and "channel_groups" not in plain
    stem_ids, fc_ids = dense["channel_groups"]
    assert stem_ids.dtype == fc_ids.dtype == torch.int64
    assert stem_ids.shape == (3,) and fc_ids.shape == (6,)
    # the image channels and the grouped conv's outputs (it mixes channels) are not coupled:
    # every column is a group of its own, numbered 0..8 across both tensors
    assert sorted(torch.cat([stem_ids, fc_ids]).tolist()) == list(range(9))


def test_coupled_ids_in_a_plain_chain_are_the_input_channel_groups():
    chain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    coupled = _coupled_groups(chain, torch.randn(1, 3, 9, 9))
    per_channel = rmda_fused.param_groups(chain, lam=0.1)
    assert [ids(g["params"]) for g in coupled] == [ids(g["params"]) for g in per_channel]
    # one group per column: as many distinct ids as columns, ids 0..n-1
    all_ids = torch.cat(coupled[0]["channel_groups"])
    assert sorted(all_ids.tolist()) == list(range(3 + 8 + 6))
    for p, channel_ids in zip(coupled[0]["params"], coupled[0]["channel_groups"]):
        assert channel_ids.shape == (p.shape[1],)


def test_coupled_ids_are_renumbered_without_frozen_weights():
    torchvision = pytest.importorskip("torchvision", reason="the model comes from torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[0].conv1.requires_grad_(False)  # one of the readers of layer1's stream
    dense = _coupled_groups(model, torch.randn(1, 3, 32, 32))[0]
    assert id(model.layer1[0].conv1.weight) not in ids(dense["params"])
    all_ids = torch.cat(dense["channel_groups"])
    assert sorted(all_ids.unique().tolist()) == list(range(int(all_ids.max()) + 1))
    by_param = dict(zip(ids(dense["params"]), dense["channel_groups"]))
    # layer1.1.conv1 still shares its ids with layer2.0's conv1 and downsample
    for other in (model.layer2[0].conv1, model.layer2[0].downsample[0]):
        assert torch.equal(by_param[id(model.layer1[1].conv1.weight)], by_param[id(other.weight)])


def test_coupled_needs_example_inputs_and_others_refuse_them():
    with pytest.raises(ValueError, match="example_inputs"):
        rmda_fused.param_groups(SeparableNet(), lam=0.1, grouping="coupled")
    with pytest.raises(ValueError, match="only used by grouping 'coupled'"):
        rmda_fused.param_groups(SeparableNet(), lam=0.1, example_inputs=torch.randn(1, 3, 5, 5))


def test_coupled_without_torch_pruning_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning fails
    with pytest.raises(ImportError, match="pip install torch-pruning"):
        rmda_fused.param_groups(SeparableNet(), lam=0.1, grouping="coupled",
                                example_inputs=torch.randn(1, 3, 5, 5))


def test_coupled_on_a_model_torch_pruning_cannot_trace_names_the_model():
    from rmda_fused.slim import SlimError

    torchvision = pytest.importorskip("torchvision", reason="the model comes from torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(SlimError, match="Torch-Pruning failed on ShuffleNetV2"):
        _coupled_groups(model, torch.randn(1, 3, 32, 32))
