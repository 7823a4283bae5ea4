"""Datasets over decoded images: ImageDataset, the training and evaluation transforms, batches, targets."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from imgcls.data import imagecache, images, stratify
from imgcls.data.stratify import derived_seed


class ImageDataset(Dataset):
    """(uint8 CHW tensor, label, index) per image; an unreadable image gives None, never an exception.

    Keyed by an index, or by (index, epoch[, draw]) as ResumableSampler yields: then the augmentation of
    that draw of the image in that epoch is seeded from (seed, epoch, index[, draw]), the same in any worker
    process and after any resume. An image's first draw keeps the seed it had before draws were counted.
    """

    def __init__(self, items: list[tuple[str, Any]], size: int, transform: Callable | None = None,
                 cache: imagecache.ImageCache | None = None, seed: int = 0, max_bytes: int = images.MAX_BYTES,
                 num_classes: int | None = None, interpolation: str = "bilinear"):
        self.paths = [p for p, _ in items]
        self.labels = targets(items, num_classes)
        self.size, self.transform, self.cache, self.seed, self.max_bytes = size, transform, cache, seed, max_bytes
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int, int] | None:
        i, epoch, draw = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        if self.cache is not None:
            arr = self.cache.get(self.paths[i])
            if arr is None:
                return None
        else:
            try:
                arr = images.load_image(self.paths[i], self.size, self.max_bytes, self.interpolation)
            except (images.BadImage, OSError) as e:  # changed or deleted since the check: skip, go on
                imagecache.warn(f"skipped {self.paths[i]}: {e}")
                return None
        x = torch.from_numpy(arr).permute(2, 0, 1)
        if self.transform is not None:
            if epoch is None:
                x = self.transform(x)
            else:
                transform = self.transform.at(epoch) if isinstance(self.transform, BySize) else self.transform
                with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                    torch.manual_seed(derived_seed(self.seed, epoch, i, draw) if draw else
                                      derived_seed(self.seed, epoch, i))  # a first draw: the seed it always had
                    x = transform(x)
        return x, self.labels[i], i


def targets(items: list[tuple[str, Any]], num_classes: int | None) -> list:
    """What the loss compares with, per item: its class index, or a multi-label item's multi-hot vector."""
    if not stratify.is_multilabel(items):
        return [y for _, y in items]
    if num_classes is None:
        raise ValueError("multi-label items need num_classes")  # a bug
    return [multi_hot(y, num_classes) for _, y in items]


def collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; also say how many in the batch could not be read."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), len(batch)
    xs, ys, idx = zip(*good)
    y = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.as_tensor(ys)
    return torch.stack(xs), y, torch.as_tensor(idx), len(batch) - len(good)


def train_transform(img_size: int, augment: str = "basic", min_scale: float = 0.35,
                    hflip: float = 0.5) -> Callable:
    """Augmentation on uint8 tensors (cheap, and the same for cached and uncached images)."""
    from torchvision.transforms import v2

    if augment == "none":
        return v2.CenterCrop(img_size)
    steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if augment == "randaugment":
        steps.append(v2.RandAugment())
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)


class BySize:
    """Training crops whose size depends on the epoch (progressive resizing: small crops first, cheaper,
    then --img-size): the dataset asks for the epoch's transform, so every worker process and every resume
    takes the same size for an epoch."""

    def __init__(self, size_of: Callable[[int], int], make: Callable[[int], Callable]):
        self.size_of, self.make, self.made = size_of, make, {}

    def at(self, epoch: int) -> Callable:
        size = self.size_of(epoch)
        if size not in self.made:
            self.made[size] = self.make(size)
        return self.made[size]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # without an epoch: the final size
        return self.at(sys.maxsize)(x)


def eval_transform(img_size: int) -> Callable:
    from torchvision.transforms import v2

    return v2.CenterCrop(img_size)


def multi_hot(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """A float target vector with 1 at each of the image's labels."""
    target = torch.zeros(num_classes)
    target[list(labels)] = 1.0
    return target
