"""The compact image cache against the raw one, in one sitting, on the same generated photos; prints ratios.

    python bench/bench_cache.py                      # 400 generated 800x600 JPEGs, caches at 256 px
    python bench/bench_cache.py --images 1000

Measures: bytes per image on disk; the time to build each cache; loader images/s on one core for
augmented 224 px training crops (RandomResizedCrop + flip, as train.py makes them; one thread, no
workers); and the validation accuracy of the same short training runs (ResNet18 from scratch, 128 px
crops, seeds 0..N-1) through each cache. Writes bench/results-cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import make_photos  # noqa: E402

from imgcls.data import datasets, imagecache  # noqa: E402


def loader_speed(cache, items: list[tuple[str, int]], size: int) -> float:
    """Augmented crops per second on one core, through the cache."""
    ds = datasets.ImageDataset(items, size, datasets.train_transform(224), cache, seed=0)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[(i, 0)]
    return len(ds) / (time.perf_counter() - t0)


def accuracy(data: Path, kind: str, out: Path, epochs: int, seeds: int) -> list[float]:
    """Best val accuracy of the same short run through the cache, once per seed (one run is noise)."""
    accs = []
    for seed in range(seeds):
        cmd = [sys.executable, "train.py", "--data", str(data), "--out", str(out / str(seed)), "--mode", "scratch",
               "--img-size", "128", "--epochs", str(epochs), "--image-cache", kind, "--no-summary", "--seed", str(seed)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        accs.append(json.loads((out / str(seed) / "summary.json").read_text())["best_val_acc"])
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="cache size (the shorter side), px")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3, help="training runs per cache (seeds 0..N-1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["IMGCLS_CACHE"] = str(work / "cache")
        data = make_photos(work / "photos", args.images)
        items = [(str(p), 0) for p in sorted(data.rglob("*.jpg"))]
        paths = sorted(p for p, _ in items)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "images": len(paths), "size": args.size}
        for kind in ("raw", "compact"):
            cache = imagecache.make_cache(kind, paths, args.size)
            t0 = time.perf_counter()
            cache.build(progress=False)
            on_disk = sum(f.stat().st_size for f in cache.path.parent.glob(cache.path.name.split("-")[0] + "*"))
            results[kind] = {"build_s": time.perf_counter() - t0, "bytes_per_image": on_disk / len(paths),
                             "loader_img_s_one_core": loader_speed(cache, items, args.size),
                             "val_acc_128px": accuracy(data, kind, work / f"run-{kind}", args.epochs, args.seeds)}
            results[kind]["mean_val_acc_128px"] = sum(results[kind]["val_acc_128px"]) / args.seeds
    raw, compact = results["raw"], results["compact"]
    results["ratios"] = {"size": compact["bytes_per_image"] / raw["bytes_per_image"],
                         "loader": compact["loader_img_s_one_core"] / raw["loader_img_s_one_core"],
                         "val_acc_points": compact["mean_val_acc_128px"] - raw["mean_val_acc_128px"]}
    (ROOT / "bench" / "results-cache.json").write_text(json.dumps(results, indent=1))
    print(f"{results['images']} photos, caches at {args.size} px; machine: {results['machine']}")
    print("| cache | KB per image | build (s) | loader img/s, one core (224 px crops) | val acc, 128 px runs |")
    print("|---|---|---|---|---|")
    for kind in ("raw", "compact"):
        r = results[kind]
        print(f"| {kind} | {r['bytes_per_image'] / 1000:.1f} | {r['build_s']:.1f} | {r['loader_img_s_one_core']:.0f} | "
              f"{r['mean_val_acc_128px']:.2f}% ({', '.join(f'{a:.1f}' for a in r['val_acc_128px'])}) |")
    q = results["ratios"]
    print(f"compact / raw: size {q['size']:.3f}x, loader {q['loader']:.2f}x, accuracy {q['val_acc_points']:+.2f} "
          "points")


if __name__ == "__main__":
    main()
