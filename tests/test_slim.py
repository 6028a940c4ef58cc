"""rmda_fused.slim: a model with exactly-zero input-channel groups becomes a smaller dense model
computing the same function; with coupled groups every zero group is a removed channel."""
import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torch_pruning")

import rmda_fused.slim  # noqa: E402
from rmda_fused.coupling import column_groups, zero_groups_  # noqa: E402
from rmda_fused.slim import EXACT_RTOL, SelectInputs, compare, export_slim, slim  # noqa: E402
from rmda_fused.train.models import digits_cnn  # noqa: E402


def _nontrivial_bn(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine terms: a BN bias must not leak into removed channels."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _resnet18_with_zero_input_channels() -> nn.Module:
    torch.manual_seed(0)
    model = _nontrivial_bn(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        # a plain producer -> consumer pair: layer1.0.conv1's filters 0-9 are read by nobody
        model.layer1[0].conv2.weight[:, :10] = 0
        # the residual stream of layer2, read by layer2.1.conv1 and layer3.0's conv1 and
        # downsample: channels 0-9 ignored by all three consumers (removable everywhere)
        for conv in (model.layer2[1].conv1, model.layer3[0].conv1, model.layer3[0].downsample[0]):
            conv.weight[:, :10] = 0
        # ... and channels 10-19 ignored by one consumer only: the stream keeps them
        model.layer2[1].conv1.weight[:, 10:20] = 0
        # layer4's stream, read by layer4.1.conv1 and the classifier: 0-49 ignored by both,
        # 50-59 by the classifier alone
        model.layer4[1].conv1.weight[:, :50] = 0
        model.fc.weight[:, :60] = 0
    return model.eval()


def test_resnet18_slim_matches_and_shrinks():
    model = _resnet18_with_zero_input_channels()
    x = torch.randn(4, 3, 32, 32)
    slimmed = slim(model, x[:1])
    assert model.fc.in_features == 512  # the original is untouched
    # removed where every consumer ignores the channel, producers and BN included
    assert slimmed.layer1[0].conv1.out_channels == 54 and slimmed.layer1[0].bn1.num_features == 54
    assert slimmed.layer2[0].conv2.out_channels == 118 and slimmed.layer2[0].downsample[1].num_features == 118
    assert slimmed.layer3[0].downsample[0].in_channels == 118
    assert slimmed.layer4[1].conv2.out_channels == 462
    # channels only some consumers ignore: the producer keeps them, the consumer selects
    assert isinstance(slimmed.layer2[1].conv1, SelectInputs) and slimmed.layer2[1].conv1.layer.in_channels == 108
    assert isinstance(slimmed.fc, SelectInputs) and slimmed.fc.layer.in_features == 452

    report = compare(model, slimmed, x, repeats=2)
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["max_abs_output"])
    assert report["max_abs_output"] > 0.1  # a non-trivial function was compared
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]


def _digits_with_zero_columns() -> nn.Module:
    model = digits_cnn().eval()
    with torch.no_grad():  # flatten -> linear: channel c of conv2 is columns 4c..4c+3
        model[3].weight[:, :8] = 0     # conv1 filters 0-7 are unused
        model[7].weight[:, :22] = 0    # conv2 channels 0-4 unused, and channel 5 partly
    return model


def test_export_saves_the_fastest_exact_model_and_its_report(tmp_path):
    model = _digits_with_zero_columns()
    x = torch.randn(5, 1, 8, 8)
    report = export_slim(model, x, tmp_path / "slim.pt", repeats=2)
    candidates = report["candidates"]
    assert set(candidates) == {"dense", "slim", "slim_select_inputs"}
    assert all(c["exact"] for c in candidates.values())
    assert report["chosen"] == min(candidates, key=lambda n: candidates[n]["latency_ms"])
    assert candidates["slim"]["params"] < candidates["dense"]["params"]
    assert candidates["slim_select_inputs"]["params"] < candidates["slim"]["params"]
    assert candidates["slim"]["removed_channels"] == 8 + 5
    assert candidates["slim_select_inputs"]["selected_inputs"] == 2
    loaded = torch.load(tmp_path / "slim.pt", weights_only=False)
    assert sum(p.numel() for p in loaded.parameters()) == candidates[report["chosen"]]["params"]
    assert report["params_after"] == candidates[report["chosen"]]["params"]
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert (tmp_path / "slim.pt.json").exists()


@pytest.mark.parametrize("fastest", ["dense", "slim", "slim_select_inputs"])
def test_export_never_keeps_a_model_slower_than_another(tmp_path, monkeypatch, fastest):
    def timed(models, inputs, repeats=20, warmup=3, clock=None):
        return {name: [1.0] if name == fastest else [2.0] for name in models}

    monkeypatch.setattr(rmda_fused.slim, "pass_times_ms", timed)
    model = _digits_with_zero_columns()
    report = export_slim(model, torch.randn(5, 1, 8, 8), tmp_path / "slim.pt", repeats=1)
    loaded = torch.load(tmp_path / "slim.pt", weights_only=False)
    assert report["chosen"] == fastest
    assert (loaded[0].out_channels, isinstance(loaded[7], SelectInputs)) == dict(
        dense=(32, False), slim=(24, False), slim_select_inputs=(24, True))[fastest]
    assert (report["params_after"] == report["params_before"]) == (fastest == "dense")


class SmallResNet(nn.Module):
    """Two residual blocks (one downsampling, with a 1x1 shortcut) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a1, self.a1n = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a2, self.a2n = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1, self.b1n = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.b2, self.b2n = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):  # (N, 3, 8, 8)
        x = self.stem(x)
        x = torch.relu(x + self.a2n(self.a2(torch.relu(self.a1n(self.a1(x))))))
        x = torch.relu(self.down(x) + self.b2n(self.b2(torch.relu(self.b1n(self.b1(x))))))
        return self.fc(x.flatten(1))


def _small_resnet():
    return SmallResNet(), torch.randn(4, 3, 8, 8)


def _resnet18():
    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)


def _mobilenet_v3_small():
    return torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(2, 3, 32, 32)


def _dense_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}


@pytest.mark.parametrize("build", [_small_resnet, _resnet18, _mobilenet_v3_small])
def test_every_zero_coupled_group_becomes_a_removed_channel(build):
    torch.manual_seed(0)
    model, x = build()
    model = _nontrivial_bn(model)
    groups = column_groups(model, x[:1])
    zero = groups.coupled & (torch.rand(groups.num_groups) < 0.5)
    zero_groups_(groups, zero)
    slimmed = slim(model, x[:1])
    assert (slimmed.slim_removed_channels, slimmed.slim_kept_channels) == (int(zero.sum()), 0)
    assert slimmed.slim_selected_inputs == 0
    assert not any(isinstance(m, SelectInputs) for m in slimmed.modules())
    # every dense layer keeps exactly the columns of its non-zero groups, none of them zero
    for name, layer in _dense_layers(model).items():
        kept = slimmed.get_submodule(name).weight
        assert kept.shape[1] == int((~zero[groups.ids[layer.weight]]).sum()), name
        assert (kept != 0).transpose(0, 1).reshape(kept.shape[1], -1).any(dim=1).all(), name
    # depthwise convs (MobileNetV3) lose the channels of their set too
    depthwise = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    for name in depthwise:
        conv = slimmed.get_submodule(name)
        assert conv.groups == conv.in_channels == conv.out_channels, name
    if depthwise:
        assert sum(slimmed.get_submodule(n).out_channels for n in depthwise) < sum(
            model.get_submodule(n).out_channels for n in depthwise)
    report = compare(model, slimmed, x, repeats=1)
    assert report["max_abs_diff"] <= EXACT_RTOL * report["max_abs_output"]
    assert report["max_abs_output"] > 1e-3  # a non-trivial function was compared
    assert report["macs_after"] < report["macs_before"]


def test_a_set_whose_channels_are_all_zero_keeps_one():
    torch.manual_seed(0)
    model = _nontrivial_bn(SmallResNet())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.a2.weight.zero_()  # all of a1's outputs: a2 is their only reader
        model.fc.weight[:, : 16 * 16 - 16] = 0  # the last stream: all but its last channel
    slimmed = slim(model, x[:1])
    assert slimmed.a1.out_channels == slimmed.a1n.num_features == slimmed.a2.in_channels == 1
    assert slimmed.b2.out_channels == slimmed.down[0].out_channels == 1
    assert (slimmed.slim_removed_channels, slimmed.slim_kept_channels) == (7 + 15, 1)
    report = compare(model, slimmed, x, repeats=1)
    assert report["max_abs_diff"] <= EXACT_RTOL * report["max_abs_output"]


def test_slim_report_script_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.slim_report", "--out", str(tmp_path),
           "--models", "mobilenet_v3_small", "--fractions", "0.5", "--batch", "2",
           "--image-size", "32", "--repeats", "1"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cpu_cores", "torch", "date"} <= set(result["machine"])
    coupled, independent = result["rows"]
    assert coupled["setting"] == "coupled 50%" and set(coupled["slim"]) == {"slim"}
    slimmed = coupled["slim"]["slim"]
    assert slimmed["removed_channels"] == coupled["zero_groups"] == coupled["groups"] // 2
    assert slimmed["selected_inputs"] == 0 and slimmed["exact"]
    assert set(independent["slim"]) == {"slim", "slim_select_inputs"}
    assert independent["slim"]["slim_select_inputs"]["selected_inputs"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "coupled 50%" in report and "input_channel 50% per layer" in report
