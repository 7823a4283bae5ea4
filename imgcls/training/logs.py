"""A run's logs: metrics.csv, TensorBoard scalars, summary.json and the epoch line (RunLog: rank 0's, as a
run trains)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from imgcls import files, plots, runfolder
from imgcls.data import folders, imagecache
from imgcls.evaluation import multilabel
from imgcls.recipes import progressive_size
from imgcls.training import runstate
from imgcls.training.keep import Best
from imgcls.training.step import Progress


def write_metrics(run_dir: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """metrics.csv (and curves.png) rewritten from the checkpoint's history, so a resume never duplicates.
    A multi-label run has mAP and F1 (at 0.5) where the others have accuracy."""
    multi = bool(history) and "val_map" in history[0]
    keys = (["epoch", "train_loss", "val_loss", "val_map", "val_f1", "lr", "img_per_s", "time_s"] if multi else
            ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "time_s"])
    ema = "ema_val_map" if multi else "ema_val_acc"
    if any(ema in h for h in history):
        keys[5:5] = ["ema_val_loss", ema]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    files.atomic_write_text(run_dir / runfolder.METRICS, text.getvalue())
    if curves:
        plots.save(plots.curves_figure(history, run_dir.name), run_dir / runfolder.CURVES)


def write_summary(model: nn.Module, img_size: int, path: Path, arch: str) -> None:
    """torchsummary's layer table; a network it cannot trace (layers returning lists or tuples: DenseNet,
    torchvision's ViTs, many of timm's) trains without one, with a warning."""
    from torchsummary import summary

    model.eval()  # a summary forward pass must not move BatchNorm statistics
    hooks = {id(m): set(m._forward_hooks) for m in model.modules()}
    table = io.StringIO()
    try:
        with contextlib.redirect_stdout(table):
            summary(model, (3, img_size, img_size), device="cpu")
    except Exception as e:  # torchsummary's own failure: the table is optional
        imagecache.warn(f"no model_summary.txt: torchsummary cannot trace {arch} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:100] if str(e) else ''}); --no-summary skips it")
        return
    finally:  # hooks it left behind when it failed half-way
        for m in model.modules():
            for key in set(m._forward_hooks) - hooks.get(id(m), set()):
                del m._forward_hooks[key]
    files.atomic_write_text(path, table.getvalue())


def calibration_line(c: dict[str, Any]) -> str:
    """The end of a run: the temperature and the calibration error on validation images it was not fitted on
    (each half fitted on the other), or why no temperature was kept."""
    errors = f"{100 * c['ece_raw']:.2f}% -> {100 * c['ece']:.2f}%"
    few = (f" (only {c['images']} validation images: a rough fit, kept near 1 by its prior)"
           if c.get("images", FEW_TO_CALIBRATE) < FEW_TO_CALIBRATE else "")
    if "kept" not in c:  # a run from before the held-out check: its error is on the images it was fitted on
        return f"calibrated: temperature {c['temperature']:.3f}; expected calibration error on val {errors}{few}"
    if c["kept"]:
        return (f"calibrated: temperature {c['temperature']:.3f}; expected calibration error {errors}, on validation "
                f"images the temperature was not fitted on (each half fitted on the other){few}")
    return (f"not calibrated: a temperature fitted on the validation images ({c['fitted']:.3f}) raised the expected "
            f"calibration error on those it was not fitted on ({errors}, each half fitted on the other), so "
            f"probabilities stay the raw softmax (temperature 1){few}")


def literal_markdown(text: str) -> str:
    """Text that TensorBoard, which renders Markdown, shows as written: an indented code block (a class
    `__background__` is no bold 'background', `[a](b)` no link)."""
    return "\n".join("    " + line for line in folders.shown(text).splitlines())


SCALARS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
           "val_map": "val/map", "val_f1": "val/f1", "ema_val_loss": "val/ema_loss", "ema_val_acc": "val/ema_acc",
           "ema_val_map": "val/ema_map"}  # history row -> TensorBoard tag


def log_epoch(writer: Any, row: dict[str, Any], confusion: list[list[int]] | None, classes: list[str]) -> None:
    step = row["epoch"]
    for key, tag in SCALARS.items():
        if key in row:
            writer.add_scalar(tag, row[key], step)
    writer.add_scalar("lr", row["lr"], step)
    writer.add_scalar("train/img_per_s", row["img_per_s"], step)
    if confusion is not None:
        writer.add_figure("val/confusion_matrix", plots.confusion_figure(np.array(confusion), classes, shares=False),
                          step)
    writer.flush()


def val_score(row: dict[str, Any]) -> float:
    """An epoch's validation score from its history row: accuracy, or a multi-label run's mAP."""
    return row["val_acc"] if "val_acc" in row else row["val_map"]


def metric_name(multi: bool) -> str:
    return "mAP" if multi else "accuracy"


FEW_TO_CALIBRATE = 100  # validation images below which the fitted temperature is said to be rough


def unreadable(train: int, val: int) -> str:
    """The epoch line's note of images that could not be read, training's and validation's."""
    said = ", ".join(f"{n} {what}" for n, what in ((train, "train"), (val, "val")) if n)
    return f"  (unreadable: {said})" if said else ""


def history_row(epoch: int, stats: dict[str, float], val: dict[str, Any], ema_val: dict[str, Any] | None,
                multi: bool, world: int) -> dict[str, Any]:
    """metrics.csv's line: training loss (and accuracy), validation loss and accuracy; a multi-label
    run's validation mAP and F1 at 0.5 instead of accuracies."""
    row: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"]}
    if multi:
        row |= {"val_loss": val["loss"], "val_map": val["map"], "val_f1": val["f1"]}
    else:
        row |= {"train_acc": stats["acc"], "val_loss": val["loss"], "val_acc": val["acc"]}
    row |= {"lr": stats["lr"], "img_per_s": stats["img_per_s"] * world, "time_s": stats["time_s"]}
    if ema_val is not None:
        key = "map" if multi else "acc"
        row |= {"ema_val_loss": ema_val["loss"], f"ema_val_{key}": ema_val[key]}
    return row


class RunLog:
    """What a run tells as it trains (rank 0's; the others' say nothing): the epoch line, metrics.csv and its
    curves, TensorBoard, its warnings, summary.json, and the last lines."""

    def __init__(self, run: runstate.Run):
        self.run_dir, self.cfg, self.classes, self.lead = run.run_dir, run.cfg, run.split.classes, run.lead
        self.multi, self.img_size, self.start, self.notes = run.split.multilabel, run.preprocess.img_size, \
            run.start, run.notes
        self.writer: Any = None
        self.last_drawn = 0.0

    def open(self, progress: Progress, per_epoch: int) -> None:
        """TensorBoard (rank 0): a resumed run's log continues after its last saved epoch."""
        from torch.utils.tensorboard import SummaryWriter

        start = self.start
        self.writer = SummaryWriter(self.run_dir, purge_step=progress.epoch + 1 if start.ckpt else None)
        for note in self.notes:
            self.writer.add_text("imbalance", literal_markdown(note))
        if start.ckpt is not None:
            print(f"resuming {self.run_dir} at {progress.where(per_epoch)}" +
                  (" with " + ", ".join(f"--{k.replace('_', '-')} {v[1]}" for k, v in start.changes.items())
                   if start.changes else ""))

    def augmented(self, x: Any) -> None:
        """The first training batch as the network sees it (TensorBoard's images)."""
        if self.writer is not None and x is not None:
            self.writer.add_images("train/augmented", x[:32], 0)

    def warn(self, line: str, epoch: int) -> None:
        """A run-health warning: on the screen, and in TensorBoard's text tab (summary.json has them all)."""
        if self.lead:
            imagecache.warn(line)
            self.writer.add_text("warnings", folders.shown(line), epoch)

    def epoch(self, row: dict[str, Any], confusion: list[list[int]] | None, history: list[dict[str, Any]],
              last: bool) -> None:
        """metrics.csv and TensorBoard after an epoch. Pictures cost ~0.5 s: with short epochs (cached
        features) they are drawn at most once a minute, and always for the last epoch."""
        draw = last or time.perf_counter() - self.last_drawn > 60
        write_metrics(self.run_dir, history, curves=draw)
        log_epoch(self.writer, row, confusion if draw else None, self.classes)
        self.last_drawn = time.perf_counter() if draw else self.last_drawn

    def epoch_line(self, row: dict[str, Any], improved: bool, bad: int, val_bad: int) -> str:
        """The screen's line for an epoch: losses and scores, speed, the crop size while it grows."""
        key = "map" if self.multi else "acc"
        scores = (f"train loss {row['train_loss']:.4f} " + ("" if self.multi else f"acc {row['train_acc']:.2f}%") +
                  f"  val loss {row['val_loss']:.4f} " +
                  (f"mAP {row['val_map']:.2f}% F1@0.5 {row['val_f1']:.2f}%  " if self.multi else
                   f"acc {row['val_acc']:.2f}%  ") +
                  (f"EMA {row[f'ema_val_{key}']:.2f}%  " if f"ema_val_{key}" in row else ""))
        size = progressive_size(row["epoch"] - 1, self.cfg.epochs, self.img_size, self.cfg.progressive)
        return (f"epoch {row['epoch']}/{self.cfg.epochs}  {scores}{row['img_per_s']:.0f} img/s"
                + (f" at {size} px" if size != self.img_size else "")
                + ("  *best*" if improved else "") + unreadable(bad, val_bad))

    def summary(self, best: Best, epochs: int, history: list[dict[str, Any]], train_time_s: float,
                warnings: list[str], stopped: str | None = None) -> None:
        """summary.json: the run as it ended (`stopped`: why, when it did not end by itself)."""
        cfg = self.cfg
        summary = {**best.scores(self.multi), "best_epoch": best.epoch, "epochs": epochs,
                   "train_img_per_s": float(np.mean([h["img_per_s"] for h in history])) if history else 0.0,
                   "train_time_s": train_time_s, "classes": self.classes, "multilabel": self.multi,
                   "model": cfg.model, "mode": cfg.mode, "run_dir": str(self.run_dir),
                   "warnings": warnings, **({"stopped": stopped} if stopped else {})}
        files.atomic_write_text(self.run_dir / runfolder.SUMMARY, json.dumps(summary, indent=1))

    def finish(self, best: Best, epochs: int) -> None:
        """The end of a run: TensorBoard's hyperparameters, and the best model's lines."""
        hparams = {k: v for k, v in dataclasses.asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        key = "best_val_map" if self.multi else "best_val_acc"
        self.writer.add_hparams(hparams, {f"hparam/{key}": best.acc, "hparam/epochs": epochs}, run_name=".")
        self.writer.close()
        print(f"best val {metric_name(self.multi)} {best.acc:.2f}% (epoch {best.epoch}); run folder {self.run_dir}")
        if self.multi and best.thresholds:
            print(f"per-label thresholds (tuned on val for the best F1, never below {multilabel.MIN_THRESHOLD:g}): "
                  + ", ".join(f"{c}={t:.2f}" for c, t in zip(self.classes, best.thresholds)))
        if best.calibration:
            print(calibration_line(best.calibration))
