"""Losses: cross-entropy (label smoothing, class weights), mixup/cutmix, and multi-label BCE."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from imgcls.settings import TrainConfig


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, with each label's positives weighted by `pos_weight`
    (--class-weights auto) and label smoothing as timm's BinaryCrossEntropy does it: targets moved to
    smoothing / C and 1 - smoothing + smoothing / C. Soft targets (mixup, cutmix) are taken as they are."""

    def __init__(self, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # in float32 whatever autocast gave the logits: smoothed targets (0.925) and mixed ones are not
        # representable in bf16/fp16
        logits, target = logits.float(), target.float()
        if self.smoothing:
            off = self.smoothing / target.shape[-1]
            target = target * (1 - self.smoothing) + off
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)


def pos_weight(counts: Sequence[int], images: int) -> torch.Tensor:
    """Negatives over positives per label: a rare label's few positives weigh as much as its negatives."""
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    return (images - c).clamp(min=1) / c


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse frequency, scaled so the average weight per image is 1."""
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    return c.sum() / (len(counts) * c)


def make_criterion(cfg: TrainConfig, train_counts: list[int], images: int = 0, multi: bool = False) -> nn.Module:
    """Cross-entropy; for multi-label data, binary cross-entropy per label (--class-weights auto: its
    pos_weight, negatives over positives)."""
    auto = cfg.class_weights == "auto"
    if multi:
        return BCELoss(pos_weight(train_counts, images) if auto else None,
                                  cfg.label_smoothing)
    return CrossEntropy(weight=class_weights(train_counts) if auto else None, label_smoothing=cfg.label_smoothing)


class CrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss; with class weights and label smoothing on class-index targets, computed here:
    torch's version normalises by the targets' weights through a data-dependent masked_select (for
    ignore_index, which we never use), a host sync every training step on a GPU."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is None or not self.label_smoothing or target.dim() != 1 or target.is_floating_point():
            return super().forward(logits, target)
        logp = nn.functional.log_softmax(logits.float(), dim=1)
        weight = self.weight.float()
        weight_of_target = weight[target]
        nll = -logp.gather(1, target[:, None]).squeeze(1) * weight_of_target
        smooth = -(logp * weight).sum(1) / logits.shape[1]
        eps = self.label_smoothing
        return ((1 - eps) * nll + eps * smooth).sum() / weight_of_target.sum()


def make_mix(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """Mixup and/or CutMix on the device batch (soft targets)."""
    from torchvision.transforms import v2

    choices = []
    if cfg.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
