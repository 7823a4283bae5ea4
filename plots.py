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


def curves_figure(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Loss and accuracy per epoch, train against val: the seed README's training graph."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str], normalise: bool = False) -> Figure:
    """Counts (or row shares) with class names on both axes; rows are the true classes."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else max(1.0, shown.max()))
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (share of each true class)" if normalise else " (counts)"))
    if n <= 30:
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.6 * (1 if normalise else shown.max()) else "black")
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
        ax.set_title(captions[k], fontsize=8, color=(colours[k] if colours else "black"))
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)
