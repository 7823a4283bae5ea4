"""Data sets the benches make themselves (no download), of different kinds.

  digits    scikit-learn's 8x8 handwritten digits as PNGs at 32 px (the demo's images): 10 classes, 60 of each
  scenes    crops of 11 real photos shipped with scikit-image (astronaut, cat, coffee, rocket, retina, Hubble
            field, brick, grass, gravel, camera, IHC stain), 40 per photo; validation crops come from a part of
            each photo that no training crop touches. Needs `pip install scikit-image`.
  shapes    circles, squares, triangles and crosses of random colour, size and place on noisy random
            backgrounds, 200 per class: the shape, not the colour, is the class
  textures  16 procedural patterns (stripes at four angles, checks, dots, rings, waves, noise of two grains,
            gradients, ...) in random colours, 100 per class: a larger set to pretrain a network on before
            fine-tuning it on the others
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def make_shapes(root: Path, per_class: int = 200, size: int = 96) -> Path:
    rng = np.random.default_rng(1)
    for shape in ("circle", "square", "triangle", "cross"):
        for i in range(per_class):
            background = rng.integers(0, 256, 3)
            img = Image.new("RGB", (size, size), tuple(int(v) for v in background))
            draw = ImageDraw.Draw(img)
            for _ in range(2):  # clutter: thin lines of random colours
                draw.line(tuple(int(v) for v in rng.integers(0, size, 4)), fill=tuple(int(v) for v in
                          rng.integers(0, 256, 3)), width=1)
            r = rng.uniform(0.25, 0.42) * size
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
            pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
            folder = root / ("val" if i % 5 == 4 else "train") / shape
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One pattern as a float map in [0, 1], at a random scale and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.08, 0.2)
    phase = rng.uniform(0, 2 * np.pi)
    angle = {"stripes-0": 0, "stripes-45": 45, "stripes-90": 90, "stripes-135": 135}.get(kind)
    if angle is not None:
        t = np.deg2rad(angle + rng.uniform(-8, 8))
        return (np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period + phase) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    if kind in ("dots", "rings"):
        cy, cx = (yy / period) % 1 - 0.5, (xx / period) % 1 - 0.5
        r = np.hypot(cx, cy)
        return (r < 0.25).astype(np.float32) if kind == "dots" else ((r > 0.2) & (r < 0.35)).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (xx + 0.1 * np.sin(2 * np.pi * yy / period)) / period + phase)
    if kind == "circles":
        cx, cy = rng.uniform(0.3, 0.7, 2)
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / period + phase)
    if kind in ("fine-noise", "coarse-noise"):
        cells = size // 2 if kind == "fine-noise" else 6
        small = rng.random((cells, cells)).astype(np.float32)
        return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))
    if kind == "gradient":
        t = rng.uniform(0, 2 * np.pi)
        return np.clip(0.5 + (xx - 0.5) * np.cos(t) + (yy - 0.5) * np.sin(t), 0, 1)
    if kind == "grid":
        return (((xx / period) % 1 < 0.15) | ((yy / period) % 1 < 0.15)).astype(np.float32)
    if kind == "zigzag":
        return (np.abs(((xx / period) % 1) - 0.5) * 2 > ((yy / period) % 1)).astype(np.float32)
    if kind == "blobs":
        out = np.zeros((size, size), np.float32)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.15)
            out = np.maximum(out, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        return out
    if kind == "cross-hatch":
        a = np.sin(2 * np.pi * (xx + yy) / period + phase) > 0.6
        b = np.sin(2 * np.pi * (xx - yy) / period) > 0.6
        return (a | b).astype(np.float32)
    raise ValueError(kind)


TEXTURES = ("stripes-0", "stripes-45", "stripes-90", "stripes-135", "checks", "dots", "rings", "waves", "circles",
            "fine-noise", "coarse-noise", "gradient", "grid", "zigzag", "blobs", "cross-hatch")


def make_textures(root: Path, per_class: int = 100, size: int = 80) -> Path:
    rng = np.random.default_rng(2)
    for kind in TEXTURES:
        for i in range(per_class):
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = texture(kind, size, rng)[..., None]
            pixels = a * (1 - t) + b * t + rng.normal(0, 12, (size, size, 3))
            folder = root / ("val" if i % 5 == 4 else "train") / kind
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def make_digits(root: Path, per_class: int = 60, size: int = 32) -> Path:
    """scikit-learn's 8x8 digits (the demo's images), upscaled as the demo exports them: the first `per_class`
    of each digit, every fifth for validation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = dict.fromkeys(range(10), 0)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if seen[label] == per_class:
            continue
        img = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
        folder = root / ("val" if seen[label] % 5 == 4 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(folder / f"{i:04d}.png")
        seen[label] += 1
    return root


MAKERS = {"digits": make_digits, "scenes": make_scenes, "shapes": make_shapes, "textures": make_textures}


def make(name: str, work: Path) -> str:
    """The data set's folder, made under `work` once."""
    folder = work / name
    if not (folder / "train").is_dir():
        MAKERS[name](folder)
    return str(folder)
