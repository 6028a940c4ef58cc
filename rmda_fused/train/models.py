"""Which network to train: any torchvision classification model, or the digits preset's CNN."""
from __future__ import annotations

import difflib

from torch import nn

DIGITS_ARCH = "digits_cnn"


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """The demo's small CNN for 1x8x8 digits (about 20k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 4 x 4
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 2 x 2
        nn.Flatten(), nn.Linear(64 * 2 * 2, num_classes),
    )


def torchvision_archs() -> list[str]:
    import torchvision

    # module=torchvision.models: classification only (not detection/segmentation/video)
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    """SystemExit naming close matches if ``arch`` is neither the digits CNN nor a
    torchvision classification model."""
    if arch == DIGITS_ARCH:
        return
    try:
        known = torchvision_archs()
    except ImportError:
        raise SystemExit(f"--arch {arch}: torchvision is not installed "
                         "(pip install torchvision, or pip install rmda-fused[train])") from None
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known + [DIGITS_ARCH], n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise SystemExit(f"--arch {arch}: not a torchvision classification model.{hint} "
                     f"Known: {len(known)} models, e.g. resnet18, resnet50, mobilenet_v3_large "
                     "(torchvision.models.list_models(module=torchvision.models)).")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """``arch`` for ``num_classes``; the command line pairs digits_cnn with the digits data
    and torchvision models (3-channel input) with ImageFolder trees."""
    check_arch(arch)
    if arch == DIGITS_ARCH:
        return digits_cnn(num_classes)
    import torchvision

    # their auxiliary heads return (logits, aux) tuples in training mode and would leave
    # parameters without gradients under DDP; the recipe trains the main head only
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
