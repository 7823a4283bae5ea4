"""Loaders: the resumable sampler, DataLoader settings, shards for validation, and the batch as the model's input."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from imgcls.data import datasets
from imgcls.preprocess import Preprocess

# ----------------------------------------------------------------------------- data

class ResumableSampler(Sampler[tuple[int, int, int]]):
    """Shuffled (or class-balanced) order fixed by (seed, epoch), split across ranks like
    DistributedSampler, and able to start mid-epoch so an interrupted epoch resumes where it stopped.
    Yields (index, epoch, draw), draw counting the image's earlier draws in the epoch's whole order (the
    balanced sampler draws a rare image many times; padding repeats some): the dataset seeds each image's
    augmentation from them, so each draw is a view of its own, and augmentation depends neither on the
    worker count nor on where a run was interrupted."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, weights: torch.Tensor | None = None):
        self.n, self.seed, self.rank, self.world, self.weights = n, seed, rank, world, weights
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        order = torch.cat([order, order[: self.per_rank * self.world - self.n]])  # pad like DistributedSampler
        drawn: dict[int, int] = {}
        keys = []
        for i in order.tolist():
            keys.append((i, self.epoch, drawn.get(i, 0)))
            drawn[i] = drawn.get(i, 0) + 1
        return iter(keys[self.rank::self.world][self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def make_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None, batches: list[list[int]] | None = None) -> DataLoader:
    """No more worker processes than batches in an epoch: each is a fork of the whole process (with a
    CUDA context, on a GPU), and a small validation set has work for one or two. `batches`: each batch's
    indices, given (batch_size and sampler are then unused)."""
    n = sampler.per_rank if isinstance(sampler, ResumableSampler) else len(sampler if sampler is not None else ds)
    workers = min(workers, len(batches) if batches is not None else math.ceil(n / batch_size))
    batching = dict(batch_sampler=batches) if batches is not None else dict(batch_size=batch_size, sampler=sampler)
    return DataLoader(ds, **batching, shuffle=False, num_workers=workers,
                      collate_fn=datasets.collate, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_ctrl_c if workers > 0 else None)


def ignore_ctrl_c(_: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops at the end of the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shard(ds: Dataset, rank: int, world: int) -> Dataset:
    """Every validation image on exactly one rank: no padding, so metrics count each image once."""
    return ds if world == 1 else Subset(ds, range(rank, len(ds), world))


def to_model_input(preprocess: Preprocess, device: torch.device,
                   memory_format: torch.memory_format = torch.channels_last) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch on the CPU -> normalised float batch on the device, in the model's memory format."""
    normalize = Normalize(preprocess.mean, preprocess.std).to(device)
    return lambda x: normalize(x.to(device, non_blocking=True)).contiguous(memory_format=memory_format)


class Normalize(nn.Module):
    """uint8 (or 0..1 float) NCHW images -> normalised float; done on the device, batched."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = x * 255
        return (x.float() - self.mean) / self.std
