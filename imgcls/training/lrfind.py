"""--lr-find: the learning-rate range test and the lr it suggests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgcls import files, plots, runfolder
from imgcls.errors import TrainingError
from imgcls.networks import heads
from imgcls.training import runstate
from imgcls.training.step import trains_batchnorm


def find_lr(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
            to_input: Callable, autocast: Callable, device: torch.device, scaler: torch.amp.GradScaler,
            start: float = 1e-7, end: float = 10.0) -> tuple[list[float], list[float]]:
    """LR range test: raise the lr exponentially each step (one pass over the data, 30 to 100 steps),
    record the smoothed loss, stop when it explodes. Each step goes through the GradScaler as in
    training (under fp16 the small gradients would otherwise round to zero, and the curve would not be
    the training's). Weights, optimizer and scaler are restored after."""
    steps = min(100, max(30, len(loader)))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt, saved_scaler = optimizer.state_dict(), scaler.state_dict()
    mults = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches, needs_two = iter(()), trains_batchnorm(net)
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, y, _, _ = batch
        if x is None or (needs_two and len(y) < 2):  # nothing readable, or one image BatchNorm cannot train on
            continue
        lr = start * factor ** i
        for g, m in zip(optimizer.param_groups, mults):
            g["lr"] = lr * m
        with autocast():
            loss = criterion(net(to_input(x)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected moving average
        if not math.isfinite(value) or value > 4 * best:
            break
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    net.load_state_dict(saved)
    optimizer.load_state_dict(saved_opt)
    if saved_scaler:  # (a disabled scaler has no state)
        scaler.load_state_dict(saved_scaler)
    if len(lrs) < 3:
        raise TrainingError("the lr range test diverged at once: check the data, or lower the start lr")
    return lrs, losses


def suggest_lr(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The lr to train at: the steeper-descent point, but never above a tenth of the loss minimum's lr.
    The minimum is where training starts to blow up, and the smoothed curve lags behind the loss,
    which moves the steepest point towards it; a tenth of the minimum is inside the stable region."""
    skip = min(len(losses) - 1, max(3, len(losses) // 10))  # the first points are barely smoothed: noise
    stop = skip + int(np.argmin(losses[skip:])) + 1
    slopes = np.gradient(np.array(losses[skip:stop]), np.log(lrs[skip:stop])) if stop - skip > 2 else np.zeros(1)
    steepest, minimum = float(lrs[skip + int(np.argmin(slopes))]), float(lrs[stop - 1])
    return {"lr": max(lrs[skip], min(steepest, minimum / 10)), "steepest": steepest, "minimum": minimum}


def lr_find(run: runstate.Run, model: nn.Module, net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
            criterion: nn.Module, to_input: Callable, autocast: Callable, scaler: torch.amp.GradScaler) -> int:
    """--lr-find: the range test instead of a run, in a folder named for it; its plot, numbers and
    suggestion."""
    heads.set_train_mode(model, True, run.cfg.mode)
    lrs, losses = find_lr(net, loader, optimizer, criterion, to_input, autocast, run.device, scaler)
    found = suggest_lr(lrs, losses)
    if run.lead:
        plots.save(plots.lr_figure(lrs, losses, found), run.run_dir / runfolder.LR_FIND_PLOT)
        files.atomic_write_text(run.run_dir / runfolder.LR_FIND, json.dumps({**found, "lrs": lrs, "losses": losses}))
        print(f"suggested --lr {found['lr']:.2g} (the smaller of the steepest descent, {found['steepest']:.2g}, and a "
              f"tenth of the loss minimum's lr, {found['minimum']:.2g} / 10); plot: "
              f"{run.run_dir / runfolder.LR_FIND_PLOT}")
    return 0
