"""The digits data every small example here trains on: scikit-learn's bundled 8x8 images.

1,797 real handwritten digits that ship inside scikit-learn (nothing is downloaded):

- :func:`load_digits_split` gives in-memory tensors (the ``--preset digits`` run of
  ``python -m rmda_fused.train`` and ``python -m rmda_fused.demo``);
- :func:`write_digits_imagefolder` writes them as a tiny ImageFolder tree of PNG files
  (``train/<class>/*.png``, ``val/<class>/*.png``), the layout of ImageNet, so the real
  image-loading path can be exercised (tests, smoke runs of a launch command) in seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["load_digits_split", "write_digits_imagefolder"]


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split: (train images, train labels, test images, test labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    i_train, i_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=seed)
    return (digits.images[i_train], digits.target[i_train],
            digits.images[i_test], digits.target[i_test])


def load_digits_split(seed: int, per_pixel: bool = False) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); x is (N, 1, 8, 8) normalized with train statistics.

    ``per_pixel`` standardizes each pixel on its own (the usual preprocessing for logistic
    regression); pixels constant in the training set (image corners) then become exactly 0.
    """
    x_train, y_train, x_test, y_test = _split(seed)
    x_train = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1)  # 0..16
    x_test = torch.tensor(x_test, dtype=torch.float32).unsqueeze(1)
    if per_pixel:
        mean, std = x_train.mean(0), x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
    else:
        mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, torch.tensor(y_train, dtype=torch.long),
            (x_test - mean) / std, torch.tensor(y_test, dtype=torch.long))


def write_digits_imagefolder(
    root: str | Path, train_per_class: int | None = None, val_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the digits split as 8x8 grayscale PNGs under ``root/train/<digit>/`` and
    ``root/val/<digit>/``; at most ``*_per_class`` images per class (None: all). Returns root.

    torchvision's ImageFolder opens them as RGB; train with ``--image-size`` of 32 or so.
    """
    from PIL import Image

    root = Path(root)
    x_train, y_train, x_test, y_test = _split(seed)
    for split, images, labels, limit in (("train", x_train, y_train, train_per_class),
                                         ("val", x_test, y_test, val_per_class)):
        written: dict[int, int] = {}
        for index, (image, label) in enumerate(zip(images, labels)):
            label = int(label)
            if limit is not None and written.get(label, 0) >= limit:
                continue
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 8-bit gray
            Image.fromarray(pixels).save(folder / f"{index:04d}.png")
            written[label] = written.get(label, 0) + 1
    return root
