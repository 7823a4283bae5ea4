"""How long the file check takes on a large folder, look-alike search included, against the least any
check must do (open and decode every file once with PIL), in the same run.

    python bench/bench_check.py                    # 50,000 generated 320x240 JPEGs in 10 classes
    python bench/bench_check.py --images 5000

The data set (bench/.data/check-N, made once) has a train/ and a val/ split; 1% of the val images are
resized, re-encoded copies of train images, which the check must report as leaks. Prints the cold
check (fresh cache: decode, hash, look-alike search), the warm check (remembered), the baseline, and
how many planted copies were found; writes bench/results-check-N.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcls.data import split as data_split  # noqa: E402


def photo(rng: np.random.Generator, size: tuple[int, int] = (320, 240)) -> Image.Image:
    w, h = size
    g = np.tile(np.linspace(rng.integers(0, 120), rng.integers(130, 255), w)[None, :, None], (h, 1, 3))
    img = Image.fromarray(g.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 80))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def make_data(folder: Path, n: int, classes: int = 10) -> list[tuple[str, str]]:
    """n images, 80% train / 20% val; returns the planted (train, val copy) pairs."""
    marker = folder / "planted.json"
    if marker.exists():
        return [tuple(p) for p in json.loads(marker.read_text())]
    rng = np.random.default_rng(0)
    n_val = n // 5
    planted = []

    def write(i: int) -> None:
        r = np.random.default_rng(i)
        split = "val" if i < n_val else "train"
        out = folder / split / f"c{i % classes}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        photo(r).save(out, quality=85)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(n)))
    for k in range(n_val // 100):  # 1% of val: a resized, re-encoded copy of a train image
        i = n_val + int(rng.integers(0, n - n_val))
        src = folder / "train" / f"c{i % classes}" / f"{i:06d}.jpg"
        dst = folder / "val" / f"c{i % classes}" / f"copy-{k:04d}.jpg"
        buf = io.BytesIO()
        Image.open(src).resize((200, 150)).save(buf, "JPEG", quality=70)
        dst.write_bytes(buf.getvalue())
        planted.append((str(src), str(dst)))
    marker.write_text(json.dumps(planted))
    return planted


def baseline(paths: list[str]) -> float:
    """Open and fully decode every file once with PIL, in parallel: what any check must at least do."""
    def load(p: str) -> None:
        with Image.open(p) as img:
            img.draft("RGB", (64, 64))
            img.load()

    t = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(load, paths))
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    args = parser.parse_args()
    folder = ROOT / "bench" / ".data" / f"check-{args.images}"
    t = time.perf_counter()
    planted = make_data(folder, args.images)
    print(f"data: {args.images} images in {folder} ({time.perf_counter() - t:.0f} s to make or find)")
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    base = baseline(paths)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        split = data_split.prepare_data(str(folder), cache_dir=cache, progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        data_split.prepare_data(str(folder), cache_dir=cache, progress=False)
        warm = time.perf_counter() - t
    found = {(a, b) for a, b, _ in split.leaks}
    hits = sum(tuple(p) in found for p in planted)
    result = {"images": len(paths), "cpus": os.cpu_count(), "baseline_decode_s": base, "check_cold_s": cold,
              "check_warm_s": warm, "ratio_cold_to_baseline": cold / base, "planted_copies": len(planted),
              "copies_found": hits, "leaks_reported": len(split.leaks), "within_class_pairs": len(split.repeats)}
    print(f"baseline (PIL open + decode at 64 px, {os.cpu_count()} threads): {base:.1f} s")
    print(f"check, cold cache (decode, sha1, perceptual hash, look-alike search): {cold:.1f} s "
          f"({len(paths) / cold:.0f} img/s; {cold / base:.2f}x the baseline)")
    print(f"check, warm (remembered): {warm:.1f} s")
    print(f"planted re-encoded copies found: {hits} of {len(planted)}; leaks reported {len(split.leaks)}, "
          f"within-class pairs {len(split.repeats)}")
    (ROOT / "bench" / f"results-check-{args.images}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
