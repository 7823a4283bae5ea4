"""A model over a loader: predictions and metrics (single- and multi-label), used by training's validation and by
eval."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgcls import interrupts
from imgcls.evaluation import multilabel


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable, *,
            desc: str = "predicting", show: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, dataset indices) for every readable item, in loader order, on the CPU."""
    outs, targets, indices = [], [], []
    for x, y, idx, _ in tqdm(loader, desc=desc, disable=not show or None, leave=False, dynamic_ncols=True):
        if x is None:
            continue
        with autocast():
            outs.append(model(to_input(x)).float().cpu())
        targets.append(y)
        indices.append(idx)
        interrupts.check_stop()
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(targets), torch.cat(indices)


def evaluate(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable, *,
             num_classes: int, show: bool = True, multi: bool = False) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix; exact across ranks (each image is on one rank only). Also
    this rank's logits and targets, for calibration. `score` is what picks the best model: the accuracy,
    or for a multi-label model (`multi`) the mAP."""
    if multi:
        return evaluate_multilabel(model, loader, to_input, autocast, show)
    logits, y, _ = predict(model, loader, to_input, autocast, desc="validating", show=show)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    if len(y):
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
    if dist.is_initialized():
        both = torch.cat([cm, loss_sum]).to(next(model.parameters()).device)
        dist.all_reduce(both)
        cm, loss_sum = both[:-1].cpu(), both[-1:].cpu()
    cm = cm.view(num_classes, num_classes).long()
    n = int(cm.sum())
    acc = 100 * float(cm.trace()) / max(1, n)
    return {"loss": float(loss_sum) / max(1, n), "acc": acc, "score": acc, "confusion": cm.tolist(), "images": n,
            "logits": logits, "targets": y}


def evaluate_multilabel(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable,
                        show: bool = True) -> dict[str, Any]:
    """Loss, mAP, per-label AP and F1 at 0.5 of a multi-label model. AP ranks all the images at once, so
    every rank gathers every rank's outputs: all compute the same numbers (and thresholds, later)."""
    logits, y, _ = predict(model, loader, to_input, autocast, desc="validating", show=show)
    if dist.is_initialized():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (logits, y))
        logits = torch.cat([p[0] for p in parts if len(p[1])] or [logits])
        y = torch.cat([p[1] for p in parts if len(p[1])] or [y])
    if not len(y):
        return {"loss": 0.0, "map": 0.0, "f1": 0.0, "score": 0.0, "ap": [], "images": 0, "logits": logits,
                "targets": y}
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
    truth, probs = y.numpy().astype(np.int64), torch.sigmoid(logits).numpy()
    ap = multilabel.average_precision(truth, probs)
    f1 = multilabel.micro_f1(truth, probs, [multilabel.DEFAULT_THRESHOLD] * truth.shape[1])
    score = multilabel.mean_ap(ap)
    return {"loss": loss, "map": score, "f1": f1, "score": score,
            "ap": [None if np.isnan(a) else float(a) for a in ap], "images": len(y), "logits": logits, "targets": y}


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of `t` over processes (itself when there is one), on the CPU in float64."""
    if not dist.is_initialized():
        return t
    t = t.double().to(device)
    dist.all_reduce(t)
    return t.cpu()
