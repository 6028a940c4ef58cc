"""rmda_fused.slim: a model with exactly-zero input-channel groups becomes a smaller dense model
computing the same function."""
import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torch_pruning")

from rmda_fused.slim import SelectInputs, compare, export_slim, slim  # noqa: E402
from rmda_fused.train.models import digits_cnn  # noqa: E402


def _resnet18_with_zero_input_channels() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # non-trivial BN: its bias must not leak into removed channels
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
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


def test_export_writes_a_loadable_model_and_report(tmp_path):
    model = digits_cnn().eval()
    with torch.no_grad():  # flatten -> linear: channel c of conv2 is columns 4c..4c+3
        model[3].weight[:, :8] = 0     # conv1 filters 0-7 are unused
        model[7].weight[:, :20] = 0    # conv2 channels 0-4 unused, and channel 5 partly
    x = torch.randn(5, 1, 8, 8)
    report = export_slim(model, x, tmp_path / "slim.pt", repeats=2)
    loaded = torch.load(tmp_path / "slim.pt", weights_only=False)
    assert loaded[0].out_channels == 24 and loaded[3].out_channels == 59
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert (tmp_path / "slim.pt.json").exists() and report["params_after"] < report["params_before"]
