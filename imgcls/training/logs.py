"""A run's logs: metrics.csv, TensorBoard scalars, summary.json and the epoch line."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from imgcls import files, plots, runfolder
from imgcls.data import folders, imagecache


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
