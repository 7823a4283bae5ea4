"""The optimiser and the learning-rate schedule (warm-up, step or cosine), and their state on resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from imgcls import checkpoint
from imgcls.networks import heads
from imgcls.settings import TrainConfig
from imgcls.training import logs

# ----------------------------------------------------------------------------- optimisation

class Schedule:
    """The learning-rate factor at a position in the run, in epochs (2.5: half-way through epoch 3):
    warm-up, then step/cosine/onecycle/plateau/none. It depends on the position and the settings
    alone (plateau's cuts are replayed from the validation history), so a resume with new settings
    (more epochs, another schedule) follows the new plan from where the run is, warm-up included:
    a run past its warm-up never repeats it."""

    def __init__(self, cfg: TrainConfig, history: list[dict[str, Any]] = ()):
        self.kind, self.epochs, self.warmup = cfg.scheduler, cfg.epochs, cfg.warmup_epochs
        self.step_size, self.gamma = cfg.step_size, cfg.gamma
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0
        for row in history:
            self.end_epoch(logs.val_score(row))

    def __call__(self, start: float, end: float) -> float:
        """The factor for a step from position `start` to `end`."""
        warm = min(1.0, end / self.warmup) if self.warmup else 1.0
        t = min(1.0, max(0.0, start - self.warmup) / max(1e-9, self.epochs - self.warmup))
        if self.kind == "step":
            factor = self.gamma ** (math.floor(start) // self.step_size)
        elif self.kind == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * t))
        elif self.kind == "onecycle":  # up to lr over the first 30%, then cosine down to ~0
            t = min(1.0, start / self.epochs)
            factor = (0.04 + 0.96 * (1 - math.cos(math.pi * t / 0.3)) / 2 if t < 0.3
                      else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7)) + 1e-4)
            warm = 1.0
        elif self.kind == "plateau":
            factor = self.plateau_scale
        else:
            factor = 1.0
        return warm * factor

    def end_epoch(self, score: float, patience: int = 2) -> None:
        """Plateau: multiply by gamma after `patience` epochs without a better val accuracy (mAP)."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > patience:
                self.plateau_scale *= self.gamma
                self.bad_epochs = 0


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Only trainable parameters: the head's group first, then the rest (the pretrained backbone)."""
    _, head = heads.head_of(model)
    head_ids = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in head_ids]}]
    backbone = [p for p in trainable if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone})
    kind = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW}[cfg.optimizer]
    extra = {"momentum": cfg.momentum} if cfg.optimizer in ("sgd", "rmsprop") else {}
    try:  # one fused kernel for the whole step: AdamW's step is ~8x faster on a CPU than the default loop
        optimizer = kind(groups, lr=cfg.lr, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # not for this optimizer or device
        optimizer = kind(groups, lr=cfg.lr, **extra)
    apply_settings(optimizer, cfg)
    return optimizer


def apply_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The settings' lr, weight decay and momentum on every param group: on a resume they replace the
    ones saved with the optimizer's state, so what the command line says takes effect. Finetune may
    give the pretrained layers a smaller lr (--backbone-lr-mult)."""
    for i, group in enumerate(optimizer.param_groups):
        pretrained = i > 0 and cfg.mode == "finetune"  # in scratch there are no pretrained layers
        group["base_lr"] = group["lr"] = cfg.lr * (cfg.backbone_lr_mult if pretrained else 1.0)
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        for key in ("fused", "foreach"):  # how this machine runs the step, not what a checkpoint says
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def restore_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, saved: checkpoint.Saved,
                      cfg: TrainConfig, say: Callable) -> None:
    """The saved optimizer state (momentum, Adam's moments), with the settings now given applied on
    top; another --optimizer starts its state afresh."""
    if saved.scaler:  # empty when it was off (no AMP, or bf16): an enabled one then starts afresh
        scaler.load_state_dict(saved.scaler)
    was = saved.config.get("optimizer")
    if was != cfg.optimizer:
        say(f"optimizer changed from {was} to {cfg.optimizer}: its state starts afresh")
        return
    optimizer.load_state_dict(saved.optimizer)
    apply_settings(optimizer, cfg)
