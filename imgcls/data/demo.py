"""The demo data: scikit-learn's digits exported as PNGs (data/digits/{train,test})."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "digits"  # data/digits/ at the top of the project


def export_demo(dest: Path = DEMO_DIR) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) as 32 px PNG folders:
    train/<digit>/ for training (split into train and val) and every fifth image in test/<digit>/
    for eval.py and test.py, so the demo has data the model has never seen."""
    if (dest / "test" / "9").is_dir():
        return dest
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        img = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L").resize((32, 32), Image.BICUBIC)
        folder = tmp / ("test" if i % 5 == 4 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)  # atomic: a concurrent export either wins or finds the folder done
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest
