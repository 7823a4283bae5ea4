"""Speed against the seed's recipe, in one sitting, on the same images and model; prints ratios.

    python bench/bench_train.py                          # generated 800x600 photos, ResNet18, 224 px
    python bench/bench_train.py --img-size 128
    python bench/bench_train.py --data ~/photos_bench    # your own DATA/train + DATA/val folders

Measures (each a ratio against a baseline measured in the same run):
  1. training, whole run of --epochs (start-up and cache building included): ours vs the seed recipe
  2. our per-epoch images/s from epoch 2 on vs the model's ceiling on synthetic in-memory batches
  3. transfer mode, 10 epochs: feature cache vs --no-feature-cache (wall time and val accuracy)
  4. evaluation images/s: eval.py's pipeline vs the seed's (batch 8, shuffled, a worker per CPU)
  5. preprocessing of 3000x2000 JPEGs: reduced-scale decoding vs a full PIL decode and resize
Writes the figures to bench/results-<model>-<size>px-<images>img.json as well.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLOURS = [(200, 60, 50), (50, 160, 70), (60, 80, 200), (200, 180, 40)]


def make_photos(root: Path, n: int, size: tuple[int, int] = (800, 600)) -> Path:
    """Photo-sized JPEGs: four classes of coloured scenes with random shapes and noise."""
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % len(COLOURS)
        img = Image.new("RGB", size, tuple(int(v * rng.uniform(0.6, 1.0)) for v in COLOURS[c]))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = rng.integers(20, 160)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
        folder = root / ("val" if i % 5 == 4 else "train") / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def run(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def ceiling(model_name: str, img_size: int, batch_size: int, steps: int = 5) -> float:
    """Training images/s of the model alone: synthetic batches already in memory, with our settings
    (channels_last, the allocator, mixed precision where the hardware has it)."""
    from imgcls import machine

    device = machine.pick_device("auto")
    if device.type == "cpu":
        machine.tune_cpu_allocator()
    autocast, _ = machine.precision(device, amp=True)
    model = __import__("torchvision").models.get_model(model_name, num_classes=4)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch_size,), device=device)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch_size * steps / sum(times[2:])  # the first two steps warm up


def metrics(run_dir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def bench_preprocessing(folder: Path, n: int = 6) -> dict:
    """Reduced-scale JPEG decode + resize vs full decode + resize, for 3000x2000 photos."""
    from torchvision import transforms

    from imgcls.data import images

    make = [folder / f"big{i}.jpg" for i in range(n)]
    rng = np.random.default_rng(1)
    for p in make:
        small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(small).resize((3000, 2000), Image.BICUBIC).save(p, quality=90)
    full_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    t0 = time.perf_counter()
    for p in make:
        full_tf(Image.open(p).convert("RGB"))
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in make:
        images.load_image(p, 256)
    ours = time.perf_counter() - t0
    return {"full_ms": 1000 * full / n, "ours_ms": 1000 * ours / n, "speedup": full / ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="DATA/train + DATA/val image folders (default: generated photos)")
    p.add_argument("--images", type=int, default=320, help="generated photos (80%% train, 20%% val)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--transfer-epochs", type=int, default=10)
    p.add_argument("--skip", nargs="*", default=[], choices=("train", "transfer", "eval", "preprocess"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # (runs and caches, of no use once measured)
    data = Path(a.data) if a.data else make_photos(ROOT / "bench" / ".data" / f"photos-{a.images}", a.images)
    py = sys.executable
    common = ["--data", str(data), "--model", a.model, "--img-size", str(a.img_size), "--batch-size",
              str(a.batch_size), "--no-summary", "--hflip", "0.5"]
    results: dict = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
                     f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
                     "model": a.model, "img_size": a.img_size, "data": str(data)}
    print(f"# {results['machine']}; {a.model} at {a.img_size} px, batch {a.batch_size}, data {data}")

    if "train" not in a.skip:
        env = {"IMGCLS_CACHE": str(work / "cache-train")}  # a cold cache: its building is part of the run
        ours_s, _ = run([py, "train.py", *common, "--mode", "scratch", "--epochs", str(a.epochs),
                         "--out", str(work / "ours")], env)
        rows = metrics(work / "ours")
        seed_s, out = run([py, "bench/seed_baseline.py", "train", str(data), "--model", a.model, "--epochs",
                           str(a.epochs), "--batch-size", str(a.batch_size), "--img-size", str(a.img_size)])
        seed = json.loads(out.strip().splitlines()[-1])
        top = ceiling(a.model, a.img_size, a.batch_size)
        later = float(np.mean([float(r["img_per_s"]) for r in rows[1:]])) if len(rows) > 1 else float("nan")
        results["train"] = {"ours_wall_s": ours_s, "seed_wall_s": seed_s, "wall_ratio": seed_s / ours_s,
                            "ours_epoch_img_per_s": [float(r["img_per_s"]) for r in rows],
                            "seed_epoch_img_per_s": seed["epoch_img_per_s"], "ceiling_img_per_s": top,
                            "epoch2plus_vs_ceiling": later / top,
                            "ours_val_acc": float(rows[-1]["val_acc"]), "seed_val_acc": seed["val_acc"]}
        print(f"train  {a.epochs} epochs: ours {ours_s:.1f} s, seed recipe {seed_s:.1f} s -> {seed_s / ours_s:.2f}x "
              f"less wall time")
        print(f"       ours from epoch 2: {later:.1f} img/s; ceiling (synthetic batches) {top:.1f} img/s -> "
              f"{later / top:.2f} of ceiling; seed epochs {', '.join(f'{v:.1f}' for v in seed['epoch_img_per_s'])} "
              "img/s")

    if "transfer" not in a.skip:
        torch.manual_seed(0)  # stand-in 'pretrained' weights: no download needed to measure speed
        weights = work / "weights.pth"
        torch.save(__import__("torchvision").models.get_model(a.model).state_dict(), weights)
        args = [*common, "--mode", "transfer", "--weights", str(weights), "--epochs", str(a.transfer_epochs)]
        # each run with its own cold cache: both pay for checking and decoding the images once
        fast_s, _ = run([py, "train.py", *args, "--out", str(work / "feat")],
                        {"IMGCLS_CACHE": str(work / "cache-feat")})
        slow_s, _ = run([py, "train.py", *args, "--no-feature-cache", "--out", str(work / "exact")],
                        {"IMGCLS_CACHE": str(work / "cache-exact")})
        fast_acc, slow_acc = (max(float(r["val_acc"]) for r in metrics(work / d)) for d in ("feat", "exact"))
        results["transfer"] = {"cached_wall_s": fast_s, "exact_wall_s": slow_s, "wall_ratio": slow_s / fast_s,
                               "cached_best_val_acc": fast_acc, "exact_best_val_acc": slow_acc}
        print(f"transfer {a.transfer_epochs} epochs: feature cache {fast_s:.1f} s, exact {slow_s:.1f} s -> "
              f"{slow_s / fast_s:.2f}x; best val acc {fast_acc:.2f}% vs {slow_acc:.2f}%")

    if "eval" not in a.skip:
        from bench.seed_baseline import evaluate
        from imgcls import checkpoint
        from imgcls.evaluation import predictor
        from imgcls.networks import build

        ckpt = work / "eval.pt"
        model = build.build_model(a.model, 4)
        checkpoint.save(checkpoint.of_model(a.model, [f"class{i}" for i in range(4)], model.state_dict(),
                                            build.preprocessing(a.model, a.img_size)), ckpt)
        from imgcls.data import check

        _, items, _, _ = check.scan_folder(data / "train", str(work / "cache-eval"), progress=False)
        loaded = predictor.load_model(ckpt, "auto")
        t0 = time.perf_counter()
        predictor.run_model(loaded, items, 256, None, show=False)
        ours_rate = len(items) / (time.perf_counter() - t0)
        seed_rate = evaluate(str(data / "train"), a.model, a.img_size)["img_per_s"]
        results["eval"] = {"ours_img_per_s": ours_rate, "seed_img_per_s": seed_rate, "ratio": ours_rate / seed_rate}
        print(f"eval   ours {ours_rate:.1f} img/s, seed recipe {seed_rate:.1f} img/s -> {ours_rate / seed_rate:.2f}x")

    if "preprocess" not in a.skip:
        pre = bench_preprocessing(work)
        results["preprocess_3000x2000"] = pre
        print(f"3000x2000 JPEG to a 256 px square: full decode {pre['full_ms']:.0f} ms, ours {pre['ours_ms']:.0f} ms "
              f"-> {pre['speedup']:.1f}x")

    name = f"results-{a.model}-{a.img_size}px-{a.images}img.json"
    path = ROOT / "bench" / name  # merged: a run with --skip keeps the other measurements
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    path.write_text(json.dumps(merged, indent=1))
    print(f"figures written to bench/{name}")


if __name__ == "__main__":
    main()
