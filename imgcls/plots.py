"""Pictures for people: training curves, confusion matrices and labelled image grids (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on servers with no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgcls import files
from imgcls.data.folders import shown


def plain(text: str) -> str:
    """The user's text (a class, file or run name) as matplotlib must draw it: literally. Matplotlib reads
    the text between two $ as a formula, and a broken one (`$100_$`) fails the whole figure, so each $ is
    escaped; names that are not UTF-8 are drawn with \\xNN. Every text of ours that holds a name goes
    through here."""
    return shown(text).replace("$", r"\$")


def curves_figure(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Loss (log scale: one spike does not flatten the rest) and accuracy (a multi-label run's mAP) per
    epoch, train against val, the best epoch marked; and the learning rate of each epoch."""
    epochs = [h["epoch"] for h in history]
    score = "map" if "val_map" in history[0] else "acc"  # a multi-label run: val mAP, no train accuracy
    best = max(history, key=lambda h: max(h[f"val_{score}"], h.get(f"ema_val_{score}", -1.0)))
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in ((ax_loss, "loss", "loss (log scale)"),
                           (ax_acc, score, "mAP (%)" if score == "map" else "accuracy (%)")):
        if f"train_{key}" in history[0]:
            ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", color="C0", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", color="C1", label="val")
        if any(f"ema_val_{key}" in h for h in history):  # --ema may have been turned on by a resume
            ax.plot(epochs, [h.get(f"ema_val_{key}", float("nan")) for h in history], "o--", label="val, EMA weights")
        ax.axvline(best["epoch"], color="green", alpha=0.5, linestyle=":", label=f"best epoch ({best['epoch']})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if all(h["train_loss"] > 0 and h["val_loss"] > 0 and h.get("ema_val_loss", 1) > 0 for h in history):
        ax_loss.set_yscale("log")
    ax_lr.plot(epochs, [h["lr"] for h in history], "o-", color="purple")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (at the epoch's end)")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(plain(title))
    fig.tight_layout()
    return fig


def per_label_figure(per_label: dict[str, dict[str, Any]], limit: int = 60) -> Figure:
    """A multi-label evaluation per label: AP, precision, recall and F1 at the label's threshold, as
    horizontal bars, the weakest labels (by AP) at the top; at most `limit` labels, the weakest."""
    names = sorted(per_label, key=lambda n: (per_label[n]["ap"] is not None, per_label[n]["ap"] or 0.0))[:limit]
    keys = (("ap", "AP"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1 at threshold"))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(names)))
    y = np.arange(len(names))
    for k, (key, label) in enumerate(keys):
        values = [per_label[n][key] or 0.0 for n in names]
        ax.barh(y + (k - 1.5) * 0.2, values, height=0.2, label=label)
    ax.set_yticks(y, [f"{plain(n)} ({per_label[n]['support']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (label's support in brackets)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize="small", frameon=False)
    fig.suptitle("Per label" + (f" (the {limit} weakest)" if len(per_label) > limit else ""))
    fig.tight_layout()
    return fig


MAX_CLASSES_DRAWN = 40  # a confusion picture of more classes is unreadable (and grows with their square)


def most_confused(cm: np.ndarray, k: int) -> list[int]:
    """The `k` classes most involved in mistakes (as the true class or the predicted one), in order."""
    off = cm - np.diag(np.diag(cm))
    score = off.sum(0) + off.sum(1)
    return sorted(np.argsort(-score, kind="stable")[:k].tolist())


def confusion_figure(cm: np.ndarray, classes: Sequence[str], shares: bool = True) -> Figure:
    """Counts, and (with `shares`) each true class's row as shares; rows are the true classes. Above
    MAX_CLASSES_DRAWN classes, the most-confused ones only: the full matrix is in the metrics files."""
    cm = np.asarray(cm, dtype=float)
    panels = [(cm, "counts")]
    if shares:
        panels.append((cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), "share of each true class"))
    note = ""
    if len(classes) > MAX_CLASSES_DRAWN:
        keep = most_confused(cm, MAX_CLASSES_DRAWN)
        panels = [(m[np.ix_(keep, keep)], title) for m, title in panels]
        note = f"; the {len(keep)} most-confused of {len(classes)} classes"
        classes = [classes[i] for i in keep]
    names = [plain(c) for c in classes]
    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (values, title) in zip(axes[0], panels):
        top = max(1.0, values.max())
        ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 45, ha="center" if n > 10 else "right")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({title}{note})")
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    text = f"{int(values[i, j])}" if title == "counts" else f"{values[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] > 0.6 * top else "black")
    fig.tight_layout()
    return fig


def lr_figure(lrs: Sequence[float], losses: Sequence[float], found: dict[str, float]) -> Figure:
    """The LR range test: smoothed loss against learning rate (log scale), with the suggestion and the
    two points it comes from."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="black")
    ax.axvline(found["steepest"], color="grey", linestyle=":", label=f"steepest descent {found['steepest']:.2g}")
    ax.axvline(found["minimum"], color="orange", linestyle=":", label=f"loss minimum {found['minimum']:.2g}")
    ax.axvline(found["lr"], color="red", linestyle="--", label=f"suggested lr {found['lr']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("suggested: the smaller of the steepest descent and a tenth of the loss minimum\n"
                 "(at the minimum, training starts to blow up)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray | None], captions: Sequence[str], colours: Sequence[str] | None = None,
               columns: int = 6) -> Figure:
    """Images with a caption under each (label and confidence); None shows as 'unreadable'."""
    n = max(1, len(images))
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        if images[k] is not None:
            ax.imshow(images[k])
        ax.set_title(plain(captions[k]), fontsize=8, color=(colours[k] if colours else "black"))
    fig.tight_layout()
    return fig


def reliability_figure(raw: dict[str, list[float]], calibrated: dict[str, list[float]], ece_raw: float,
                       ece: float, temperature: float | None) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling: on the diagonal, a
    model's 80% means right 80% of the time. Bar widths are the bins; the lower panel counts images."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=(3, 1), sharex=True)
    bins = len(raw["count"])
    centres = (np.arange(bins) + 0.5) / bins
    after = f"temperature {temperature:.2f}" if temperature is not None else "no fitted temperature"
    for r, colour, label, shift in ((raw, "tab:red", f"raw softmax (ECE {100 * ece_raw:.1f}%)", -0.25),
                                    (calibrated, "tab:blue", f"{after} (ECE {100 * ece:.1f}%)", 0.25)):
        acc = np.array([np.nan if a is None else a for a in r["accuracy"]], dtype=float)
        ax.bar(centres + shift / bins, acc, width=0.5 / bins, color=colour, alpha=0.7, label=label)
        ax_n.bar(centres + shift / bins, r["count"], width=0.5 / bins, color=colour, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy in the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("reliability diagram")
    ax_n.set_yscale("symlog")
    ax_n.set_xlabel("confidence (top probability)")
    ax_n.set_ylabel("images")
    fig.tight_layout()
    return fig


def risk_coverage_figure(rows: Sequence[dict[str, float]]) -> Figure:
    """Accuracy on the images kept against the share kept, per --reject-below threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    rows = [r for r in rows if r["accuracy"] is not None]
    cov = [100 * r["coverage"] for r in rows]
    ax.plot(cov, [r["accuracy"] for r in rows], "o-")
    for r, c in zip(rows, cov):
        if r["threshold"] in (0.5, 0.8, 0.9, 0.95, 0.99) and r["coverage"] > 0:
            ax.annotate(f"{r['threshold']:g}", (c, r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xlabel("coverage: images kept (%)")
    ax.set_ylabel("accuracy on the images kept (%)")
    ax.set_title("risk-coverage (labels: test.py --reject-below P)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> None:
    """Written atomically (a kill while drawing leaves the previous picture), then the figure is freed."""
    path = Path(path)
    try:
        files.atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=100,
                                                       bbox_inches="tight"))
    finally:
        plt.close(fig)
