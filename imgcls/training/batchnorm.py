"""Precise BatchNorm: running statistics recomputed over training images after the last epoch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

# ----------------------------------------------------------------------------- BatchNorm statistics

PRECISE_BN_IMAGES = 256  # at most this many training images recompute BatchNorm's statistics (precise BN)


def precise_bn_images(train_images: int) -> int:
    """How many training images recompute the statistics before each validation: a quarter of the training
    images, at least 64 and at most PRECISE_BN_IMAGES (cheap beside an epoch: one forward pass each)."""
    return min(train_images, PRECISE_BN_IMAGES, max(64, train_images // 4))


def trained_batchnorms(net: nn.Module) -> list[str]:
    """The BatchNorm layers a training step updates (in transfer mode, none of the frozen backbone's)."""
    return [name for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]


class _OwnBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer of any dimension that normalises by its own batch only (never synchronised)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def own_statistics(layer: nn.Module) -> None:
    """`layer` (a copy's) normalises each batch by that batch's statistics: training mode; a SyncBatchNorm
    made a plain BatchNorm, which waits on no other process (and runs on a CPU)."""
    if isinstance(layer, nn.SyncBatchNorm):
        layer.__class__ = _OwnBatchNorm
    layer.train()


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, names: list[str], loader: DataLoader, to_input: Callable,
                        autocast: Callable) -> int:
    """Precise BN: the running statistics of the BatchNorm layers `names`, computed afresh as the average
    over the loader's batches, with the weights as they are now. The running averages a training step
    keeps (momentum 0.1) trail the weights by ~10 steps and start at mean 0, variance 1: where the true
    variance is 1e-3 (after torchvision's depthwise convolutions) that start outweighs it for ~90 steps,
    and a network validated in between sees inputs scaled wrongly at every layer (MobileNetV2 from scratch
    stayed at chance). Only those layers run in training mode: dropout and stochastic depth stay off,
    as in evaluation. Under torchrun each process takes its share and the statistics are averaged. Returns
    the number of images used (0: the statistics are left as they were)."""
    layers = [net.get_submodule(name) for name in names]
    if not layers:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in layers]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    images = 0
    try:
        for x, y, _, _ in loader:
            if x is not None and len(y) > 1:  # (BatchNorm cannot take a batch of one)
                with autocast():
                    net(to_input(x))
                images += len(y)
    finally:
        for m, training in modes:
            m.training = training
        for m, (mean, var, count, momentum) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
            if not images:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
    return average_statistics(layers, images)


def average_statistics(layers: list[nn.Module], images: int) -> int:
    """Each process's statistics weighted by its images, averaged over the processes; the images in all."""
    if not dist.is_initialized():
        return images
    flat = torch.cat([torch.cat([m.running_mean, m.running_var]).float() * images for m in layers] +
                     [torch.tensor([float(images)], device=layers[0].running_mean.device)])
    dist.all_reduce(flat)
    total = int(flat[-1].item())
    if total:
        at = 0
        for m in layers:
            size = m.running_mean.numel()
            m.running_mean.copy_(flat[at:at + size] / total)
            m.running_var.copy_(flat[at + size:at + 2 * size] / total)
            at += 2 * size
    return total
