"""rmda_fused.param_groups: conv/linear weights regularized (grouped and depthwise convs one
group per filter), everything else not, each param once."""
from __future__ import annotations

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
