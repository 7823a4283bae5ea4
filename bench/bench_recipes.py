"""Accuracy of the default recipes against the seed's, in one sitting, on the same data, model and epochs.

    python bench/bench_recipes.py                              # the three data sets below, ResNet18 from scratch
    python bench/bench_recipes.py --sets scenes --epochs 15 --img-size 64
    python bench/bench_recipes.py --data ~/photos              # also your own folder (DIR/<class>/... or train/ val/)

Data sets, made here (no download), of different kinds and sizes:
  digits  scikit-learn's 8x8 handwritten digits as PNGs (the demo): 10 classes, 1,438 images
  scenes  crops of 11 real photos shipped with scikit-image (astronaut, cat, coffee, rocket, retina,
          Hubble field, brick, grass, gravel, camera, IHC stain), 40 per photo; validation crops come
          from a part of each photo that no training crop touches. Needs `pip install scikit-image`.
  shapes  circles, squares, triangles and crosses of random colour, size and place on noisy random
          backgrounds, 150 per class: the shape, not the colour, is the class

For each data set, ResNet18 trains from scratch with --recipe modern (the default for scratch) and
--recipe seed, same epochs and size; then --lr-find runs, and the modern recipe trains again at its
suggested lr, to check that the suggestion is stable (the largest validation loss is printed). The
finetune and transfer defaults are the seed's recipe itself, so there is nothing to compare for them.
Prints best validation accuracy, the largest validation loss and seconds per epoch, with ratios;
writes bench/results-recipes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SCENES = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "brick", "grass", "gravel",
          "camera", "immunohistochemistry")


def make_scenes(root: Path, per_class: int = 40, size: int = 128) -> Path:
    """Square crops of each photo: training crops from its left 70%, validation crops from the rest."""
    import skimage.data

    rng = np.random.default_rng(0)
    for name in SCENES:
        photo = getattr(skimage.data, name)()
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        h, w = photo.shape[:2]
        cut = int(0.7 * w)
        for i in range(per_class):
            val = i % 5 == 4
            left, right = (cut, w) if val else (0, cut)
            side = int(rng.uniform(0.2, 0.3) * min(h, w))
            x = rng.integers(left, max(left + 1, right - side))
            y = rng.integers(0, h - side)
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = np.asarray(crop, dtype=np.float32) * rng.uniform(0.75, 1.25) + rng.normal(0, 6, (size, size, 3))
            folder = root / ("val" if val else "train") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def make_shapes(root: Path, per_class: int = 150, size: int = 96) -> Path:
    rng = np.random.default_rng(1)
    for shape in ("circle", "square", "triangle", "cross"):
        for i in range(per_class):
            background = rng.integers(0, 256, 3)
            img = Image.new("RGB", (size, size), tuple(int(v) for v in background))
            draw = ImageDraw.Draw(img)
            for _ in range(3):  # clutter: lines of random colours
                draw.line(tuple(int(v) for v in rng.integers(0, size, 4)), fill=tuple(int(v) for v in
                          rng.integers(0, 256, 3)), width=2)
            r = rng.uniform(0.2, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            elif shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
            elif shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            else:
                draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
                draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
            pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 20, (size, size, 3))
            folder = root / ("val" if i % 5 == 4 else "train") / shape
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


VARIANTS = {"lr 1e-3": ["--lr", "0.001"], "trivialaugment": ["--augment", "trivialaugment"],
            "min-scale 0.6": ["--min-scale", "0.6"], "ema": ["--ema"]}


def train(args: list[str], out: Path, cache: Path) -> dict:
    """One train.py run; its best and final val accuracy, largest val loss and seconds per epoch."""
    cmd = [sys.executable, "train.py", *args, "--out", str(out), "--no-summary", "--save-interval", "1e9"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "IMGCLS_CACHE": str(cache)})
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    head, rows = rows[0], [dict(zip(rows[0], map(float, r))) for r in rows[1:]]
    assert "val_acc" in head
    return {"best_val_acc": max(r["val_acc"] for r in rows), "final_val_acc": rows[-1]["val_acc"],
            "max_val_loss": max(r["val_loss"] for r in rows), "wall_s": time.perf_counter() - t0,
            "s_per_epoch": float(np.mean([r["time_s"] for r in rows]))}


def lr_suggestion(args: list[str], out: Path, cache: Path) -> float:
    cmd = [sys.executable, "train.py", *args, "--lr-find", "--out", str(out), "--no-summary"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "IMGCLS_CACHE": str(cache)})
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads((out / "lr_find.json").read_text())["lr"]


def print_row(name: str, row: dict) -> None:
    s, m, f = row["seed"], row["modern"], row.get("modern_at_lr_find")
    print(f"{name:7s} seed {s['best_val_acc']:6.2f}%  modern {m['best_val_acc']:6.2f}% "
          f"({m['best_val_acc'] - s['best_val_acc']:+.2f});  s/epoch seed {s['s_per_epoch']:.2f}, modern "
          f"{m['s_per_epoch']:.2f} ({m['s_per_epoch'] / s['s_per_epoch']:.2f}x);  largest val loss seed "
          f"{s['max_val_loss']:.2f}, modern {m['max_val_loss']:.2f}" +
          (f";  at lr-find's {f['lr']:.2g}: {f['best_val_acc']:.2f}%, largest val loss {f['max_val_loss']:.2f}"
           if f else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="*", default=["digits", "scenes", "shapes"], choices=("digits", "scenes", "shapes"))
    p.add_argument("--data", help="also this folder")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--no-lr-find", action="store_true", help="skip the lr-find stability check")
    p.add_argument("--variants", action="store_true", help="also modern with --lr 1e-3, TrivialAugment, "
                   "--min-scale 0.6 and --ema")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcls-recipes-"))
    sets = {"digits": lambda: "demo", "scenes": lambda: str(make_scenes(work / "scenes")),
            "shapes": lambda: str(make_shapes(work / "shapes"))}
    folders = {name: sets[name]() for name in a.sets} | ({"yours": a.data} if a.data else {})
    results = {}
    for name, data in folders.items():
        base = ["--data", data, "--model", a.model, "--mode", "scratch", "--img-size", str(a.img_size),
                "--epochs", str(a.epochs), "--hflip", "0" if name in ("digits",) else "0.5"]
        row = {r: train([*base, "--recipe", r], work / "runs" / f"{name}-{r}", work / "cache")
               for r in ("seed", "modern")}
        if not a.no_lr_find:
            lr = lr_suggestion([*base, "--recipe", "modern"], work / "runs" / f"{name}-lr-find", work / "cache")
            row["modern_at_lr_find"] = train([*base, "--recipe", "modern", "--lr", f"{lr:.3g}"],
                                             work / "runs" / f"{name}-found", work / "cache") | {"lr": lr}
        if a.variants:
            for tag, extra in VARIANTS.items():
                row[tag] = train([*base, "--recipe", "modern", *extra], work / "runs" / f"{name}-{tag}", work / "cache")
                print(f"{name:7s} modern {tag}: {row[tag]['best_val_acc']:.2f}%, largest val loss "
                      f"{row[tag]['max_val_loss']:.2f}", flush=True)
        results[name] = row
        print_row(name, row)
    meta = {"model": a.model, "img_size": a.img_size, "epochs": a.epochs, "cpus": os.cpu_count()}
    path = ROOT / "bench" / "results-recipes.json"  # merged: a run of some sets keeps the others' figures
    merged = json.loads(path.read_text()) if path.exists() else {}
    if merged.get("settings") != meta:  # figures of other settings are not mixed in
        merged = {"settings": meta}
    for name, row in results.items():
        merged[name] = {**merged.get(name, {}), **row}
    path.write_text(json.dumps(merged, indent=1))
    print(f"figures written to bench/results-recipes.json (runs in {work})")


if __name__ == "__main__":
    main()
