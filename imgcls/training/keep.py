"""What a run keeps: the best model so far and what goes with it (Best), and the checkpoints written from
it, best.pt and last.pt, in the order that leaves a resumable folder at any moment (Checkpoints)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls import checkpoint, files, runfolder
from imgcls.evaluation import multilabel
from imgcls.networks import heads
from imgcls.training.ema import Ema


@dataclasses.dataclass
class Best:
    """The best model so far: its validation score (accuracy; a multi-label run's mAP) and epoch, whether
    it is the weights' average (--ema), and what was fitted on its validation: a single-label model's
    calibration and confusion matrix, a multi-label model's per-label thresholds and average precisions."""
    acc: float = -1.0
    epoch: int = 0
    averaged: bool = False
    calibration: dict[str, Any] | None = None
    confusion: list[list[int]] | None = None
    thresholds: list[float] | None = None
    ap: list[float | None] | None = None

    @classmethod
    def resumed(cls, saved: checkpoint.Saved) -> Best:
        """As the checkpoint left it (a new run's: checkpoint.Saved())."""
        return cls(saved.best_acc, saved.best_epoch, False, saved.calibration, saved.best_confusion,
                   saved.thresholds, saved.best_ap)

    def take(self, shown: dict[str, Any], epoch: int, averaged: bool, multi: bool,
             calibrate: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """A new best model, from its validation (`shown`): every rank takes it (calibrating is shared)."""
        self.acc, self.epoch, self.averaged = shown["score"], epoch, averaged
        if multi:  # every rank holds all the validation outputs (engine.evaluate_multilabel)
            self.thresholds = multilabel.tune_thresholds(shown["targets"].numpy().astype(np.int64),
                                                         torch.sigmoid(shown["logits"]).numpy())
            self.ap = shown["ap"]
        else:
            self.confusion = shown["confusion"]
            self.calibration = calibrate(shown)

    def scores(self, multi: bool) -> dict[str, Any]:
        """summary.json's scores of the best model."""
        if multi:
            return {"best_val_map": self.acc, "thresholds": self.thresholds, "val_ap": self.ap}
        return {"best_val_acc": self.acc, "calibration": self.calibration, "val_confusion": self.confusion}


def best_checkpoint(state: checkpoint.Saved, history: list[dict[str, Any]], model: nn.Module, ema: Ema | None,
                    due: bool, averaged: bool) -> checkpoint.Saved:
    """best.pt's checkpoint: the model only (what eval.py, test.py and export.py need, a third the size), of
    the trained weights, or their average (--ema) when it validated better. One not written now (`due`) holds
    a copy of them (the weights go on changing)."""
    weights = state.model if due else heads.snapshot(model)
    if averaged:
        prefix = "" if ema.source is model else heads.head_of(model)[0] + "."
        weights = weights | {prefix + k: v.detach().to("cpu", copy=True)
                             for k, v in ema.model.module.state_dict().items()}
    return dataclasses.replace(checkpoint.for_inference(state), history=list(history), model=weights,
                               averaged=averaged)


class Checkpoints:
    """best.pt and last.pt of a run (rank 0). best.pt is held in memory until the next last.pt (or a
    failure) and written before it, so a kill between them replays the epoch, which writes it again; the
    run folder's marker (runfolder.CHECKPOINTED) says what a folder without last.pt is."""

    def __init__(self, run_dir: Path, interval_s: float):
        self.run_dir, self.interval_s = run_dir, interval_s
        self.held: checkpoint.Saved | None = None  # the best epoch's checkpoint while it is not yet written
        self.last_saved = time.perf_counter()

    def due(self, finished: bool) -> bool:
        """Whether last.pt is written now. Short epochs (cached features, small data) would spend their time
        writing checkpoints: at most every --save-interval s, and at the end. A hard kill in between loses
        only the epochs since the last write: resuming trains them again (on CPU to the same digits)."""
        return finished or time.perf_counter() - self.last_saved >= self.interval_s

    def hold_best(self, best: checkpoint.Saved) -> None:
        self.held = best

    def save(self, state: checkpoint.Saved) -> None:
        """best.pt before last.pt. Until last.pt is first written, the run folder's marker says so."""
        self.save_best()
        checkpoint.save(state.to_dict(), self.run_dir / runfolder.LAST)
        if runfolder.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / runfolder.CHECKPOINTED, "saved")
        self.last_saved = time.perf_counter()

    def save_best(self) -> None:
        """best.pt, of the best model held in memory; before the run's first last.pt, marked as such (a
        folder with a best.pt and no last.pt is then one that a resume starts again, not one that lost it)."""
        if self.held is None:
            return
        if runfolder.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / runfolder.CHECKPOINTED, "saving")
        checkpoint.save(self.held.to_dict(), self.run_dir / runfolder.BEST)
        self.held = None
