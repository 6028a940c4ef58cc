"""Training and validation batches: an ImageFolder tree (ImageNet layout) or the digits.

``--data DIR`` must hold ``train/<class>/<image>`` and ``val/<class>/<image>`` with the same
class folders; ``--data digits:`` is scikit-learn's digits as in-memory tensors (no files,
no transforms). Training batches are sharded over processes by ``DistributedSampler``
(padded so every process takes the same number of steps, as DDP requires); validation is
sharded without padding, and the metrics are summed over processes, so every image counts once.
An image file that cannot be read (cut short, not an image) is left out of its batch and
reported by the job, or stops the run naming it under ``--strict-data``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from .distributed import Dist

DIGITS_SOURCE = "digits:"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def canonical_source(source: str) -> str:
    """``--data`` as a run records it: the digits as they are, a folder as its absolute path
    (``./data`` and ``data/`` are the same data on --resume)."""
    return source if source == DIGITS_SOURCE else str(Path(source).expanduser().resolve())


class Unreadable(NamedTuple):
    path: str
    error: str


class ReadableImages(Dataset):
    """An ImageFolder whose items that cannot be read come back as :class:`Unreadable`
    instead of raising in a loader worker (which would end the run with a traceback)."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as exc:  # what decoding a broken file raises: OSError, SyntaxError, ...
            return Unreadable(path, f"{type(exc).__name__}: {exc}")
        return self.folder.transform(image), label


def collate_readable(batch: list[Any]) -> tuple[Any, Any, list[Unreadable]]:
    """(images, labels, unreadable): the readable items collated (None if there are none),
    and the unreadable ones."""
    readable = [item for item in batch if not isinstance(item, Unreadable)]
    unreadable = [item for item in batch if isinstance(item, Unreadable)]
    images, labels = default_collate(readable) if readable else (None, None)
    return images, labels, unreadable


class SkipUnreadable:
    """The (images, labels) batches of a loader over :class:`ReadableImages`, without their
    unreadable images, which are kept in ``unreadable`` (``strict``: SystemExit naming the
    first). A batch left with fewer than ``min_batch`` images stops the run: training needs
    two (BatchNorm), and under DDP every process must take every step."""

    def __init__(self, loader: DataLoader, strict: bool, min_batch: int) -> None:
        self.loader, self.strict, self.min_batch = loader, strict, min_batch
        self.unreadable: list[Unreadable] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, unreadable in self.loader:
            if unreadable:
                first = unreadable[0]
                if self.strict:
                    raise SystemExit(f"--strict-data: cannot read {first.path}: {first.error}")
                self.unreadable += unreadable
                kept = 0 if labels is None else len(labels)
                if kept < self.min_batch:
                    raise SystemExit(f"--data: {len(unreadable)} of the {len(unreadable) + kept} "
                                     f"images of a batch cannot be read, e.g. {first.path}: "
                                     f"{first.error}")
            yield images, labels

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class Data:
    train: Any  # iterables of (images, labels) batches
    val: Any
    train_sampler: Any  # has set_epoch(epoch)
    num_classes: int
    train_size: int
    val_size: int

    def set_epoch(self, epoch: int) -> None:
        self.train_sampler.set_epoch(epoch)

    def take_unreadable(self) -> list[Unreadable]:
        """The images this process left out since the last call (the digits have none)."""
        taken = []
        for batches in (self.train, self.val):
            if isinstance(batches, SkipUnreadable):
                taken += batches.unreadable
                batches.unreadable = []
        return taken


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: each item once over all processes (no padding)."""

    def __init__(self, size: int, info: Dist) -> None:
        self.indices = range(info.rank, size, info.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TensorBatches:
    """Batches sliced from in-memory tensors in a sampler's order: no per-item collation,
    which would cost more than the tiny digits model's step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sampler: Sampler[int], batch_size: int) -> None:
        self.x, self.y, self.sampler, self.batch_size = x, y, sampler, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for batch in order.split(self.batch_size):
            yield self.x[batch], self.y[batch]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


def build(args: Any, info: Dist) -> Data:
    per_process = args.batch_size // info.world_size
    if args.data == DIGITS_SOURCE:
        return _digits(args, info, per_process)
    return _imagefolder(args, info, per_process)


def _digits(args: Any, info: Dist, per_process: int) -> Data:
    from ..datasets import load_digits_split

    x_train, y_train, x_val, y_val = load_digits_split(args.seed)
    sampler = DistributedSampler(range(len(y_train)), num_replicas=info.world_size,
                                 rank=info.rank, shuffle=True, seed=args.seed)
    val_shard = ShardSampler(len(y_val), info)
    return Data(
        train=TensorBatches(x_train, y_train, sampler, per_process),
        val=TensorBatches(x_val, y_val, val_shard, len(val_shard)),  # one batch: it is tiny
        train_sampler=sampler, num_classes=10,
        train_size=len(y_train), val_size=len(y_val),
    )


def check_layout(root: Path) -> list[str]:
    """The class names of an ImageFolder tree ``root/{train,val}/<class>/``, or SystemExit
    saying what is wrong with it."""
    layout = ("expected the ImageNet layout DIR/train/<class>/<image> and "
              "DIR/val/<class>/<image>")
    if not root.is_dir():
        raise SystemExit(f"--data {root}: no such directory ({layout})")
    if not any(root.iterdir()):
        raise SystemExit(f"--data {root}: the directory is empty ({layout})")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise SystemExit(f"--data {root}: no {split}/ folder ({layout})")
        classes[split] = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes[split]:
            raise SystemExit(f"--data {root}: {split}/ holds no class folders ({layout})")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise SystemExit(f"--data {root}: train/ and val/ have different class folders "
                         f"(in one but not the other: {', '.join(only[:10])})")
    return classes["train"]


def _imagefolder(args: Any, info: Dist, per_process: int) -> Data:
    from torchvision import datasets, transforms

    root = Path(args.data)
    classes = check_layout(root)
    size = args.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    # the standard 256/224 resize-then-crop ratio, scaled to --image-size
    val_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    try:
        train_set = ReadableImages(datasets.ImageFolder(str(root / "train"), train_tf))
        val_set = ReadableImages(datasets.ImageFolder(str(root / "val"), val_tf))
    except (FileNotFoundError, RuntimeError) as exc:  # e.g. class folders without images
        raise SystemExit(f"--data {root}: {exc}") from None
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed)
    common = dict(num_workers=args.workers, pin_memory=info.device.type == "cuda",
                  persistent_workers=args.workers > 0, collate_fn=collate_readable)
    # drop_last: a last batch of one image breaks BatchNorm in training mode
    train = DataLoader(train_set, per_process, sampler=sampler, drop_last=True, **common)
    if len(train) == 0:
        raise SystemExit(f"--data {root}: {len(sampler)} training images per process, fewer than "
                         f"the per-process batch of {per_process} (--batch-size {args.batch_size} "
                         f"over {info.world_size} processes)")
    val = DataLoader(val_set, per_process, sampler=ShardSampler(len(val_set), info), **common)
    return Data(train=SkipUnreadable(train, args.strict_data, min_batch=2),
                val=SkipUnreadable(val, args.strict_data, min_batch=1), train_sampler=sampler,
                num_classes=len(classes), train_size=len(train_set), val_size=len(val_set))
