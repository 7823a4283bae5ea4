"""Time to accuracy: our train.py with its defaults against timm's own train.py, in one sitting.

    python bench/bench_time_to_accuracy.py --timm-train ~/pytorch-image-models/train.py
    python bench/bench_time_to_accuracy.py --timm-train T --sets digits --variants progressive-0.75 no-amp
    python bench/bench_time_to_accuracy.py --precision        # bf16 against fp32 per model: synthetic steps

timm's train.py is not in the timm package: clone https://github.com/huggingface/pytorch-image-models and give
the path of its train.py (it runs with the timm installed here).

Each data set (bench/synthetic.py, in train/ val/ folders both programs read) trains ResNet18 from scratch at
64 px for 40 epochs, batch 64, first with ours (nothing but --model, --mode, --img-size, --epochs; plus each
--variants' options), then with timm's, runs alternated. timm gets its best CPU settings, those of our
modern recipe: AdamW lr 2e-3, weight decay 0.05, cosine after one warm-up epoch, label smoothing 0.1, bf16
autocast and channels_last where the CPU has native bf16, a gentler crop (--scale 0.35 1, ours), one
checkpoint kept, its data loader with one worker per core. The clock starts when the process starts (imports,
file checks and caches included) and an epoch counts when its validation accuracy is written to disk (our
metrics.csv, timm's summary.csv), polled every 0.2 s. Two clocks: wall seconds, and CPU seconds of the
process and its data-loader workers (what a machine busy with other work does not stretch: the figure to
compare on a shared machine). Printed: the seconds to reach each --shares of the best accuracy that every
run reached (so each can be timed), and ours / timm's. Written to bench/results-time-to-accuracy.json.

--precision: training img/s of each model (synthetic batches of 64 at 64 px, AdamW, channels_last) in bf16
autocast and in fp32, a few timed steps after warm-up, alternated: what --amp auto's table is made from.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import make

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results-time-to-accuracy.json"
VARIANTS = {"progressive-0.75": ["--progressive", "0.75"], "progressive-0.5": ["--progressive", "0.5"],
            "no-amp": ["--no-amp"], "amp": ["--amp"], "no-precise-bn": ["--no-precise-bn"]}


def folder_of(name: str, work: Path) -> Path:
    """The data set as train/ and val/ folders, which both programs read."""
    return Path(make(name, work))


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants, live (data loader workers) and reaped: the clock that a
    machine shared with other work does not stretch, as it stretches wall time."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            p = int(stat.parent.name)
            parents[p] = int(fields[1])
            own = sum(map(int, fields[11:13]))  # utime, stime
            times[p] = (own + (sum(map(int, fields[13:15])) if p == pid else 0)) / TICK  # + reaped children
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sum(times.get(p, 0.0) for p in family)


def watch(cmd: list[str], env: dict, rows: Path, column: str, timeout: float) -> list[tuple[float, float, float]]:
    """Run `cmd`; (wall seconds since start, CPU seconds, val accuracy %) of each epoch row as it appears in
    `rows`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[float, float, float]] = []
    cpu = 0.0
    while proc.poll() is None and time.perf_counter() - start < timeout:
        time.sleep(0.2)
        cpu = max(cpu, cpu_seconds(proc.pid))
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(rows) as f:
                values = [float(r[column]) for r in csv.DictReader(f)]
            seen += [(time.perf_counter() - start, cpu, v) for v in values[len(seen):]]
    if proc.poll() is None:
        proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-1500:]}", flush=True)
    return seen


def ours(data: Path, out: Path, cache: Path, epochs: int, extra: list[str]) -> list[tuple[float, float, float]]:
    cmd = [sys.executable, "train.py", "--data", str(data), "--model", "resnet18", "--mode", "scratch",
           "--img-size", "64", "--epochs", str(epochs), "--out", str(out), "--overwrite", "--no-summary", *extra]
    return watch(cmd, {**os.environ, "IMGCLS_CACHE": str(cache)}, out / "metrics.csv", "val_acc", 3600)


def timms(script: Path, data: Path, out: Path, epochs: int, classes: int, bf16: bool
          ) -> list[tuple[float, float, float]]:
    cmd = [sys.executable, str(script), str(data), "--train-split", "train", "--val-split", "val", "--model",
           "resnet18", "--num-classes", str(classes), "--img-size", "64", "--epochs", str(epochs), "-b", "64",
           "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1",
           "--warmup-lr", "1e-5", "--smoothing", "0.1", "--scale", "0.35", "1", "--device", "cpu", "--workers",
           str(os.cpu_count() or 1), "--channels-last", "--checkpoint-hist", "1", "--output", str(out.parent),
           "--experiment", out.name, "--log-interval", "1000", *(["--amp", "--amp-dtype", "bfloat16"] if bf16 else [])]
    return watch(cmd, dict(os.environ), out / "summary.csv", "eval_top1", 3600)


def time_to(curve: list, target: float, clock: int) -> float | None:
    """Seconds (clock 0: wall, 1: CPU) until the validation accuracy first reached `target`."""
    return next((row[clock] for row in curve if row[2] >= target), None)


def shown(t: float | None) -> str:
    return f"{t:.0f} s" if t is not None else "not reached"


def targets(row: dict[str, list], shares: list[float]) -> list[float]:
    """Accuracies to time: shares of the best accuracy that every run reached (so each can be timed)."""
    reached = min(max((r[2] for r in curve), default=0.0) for curve in row.values())
    return [round(share * reached, 1) for share in shares]


def report(name: str, row: dict[str, list], shares: list[float]) -> None:
    for target in targets(row, shares):
        for clock, what in ((1, "CPU"), (0, "wall")):
            base = time_to(row.get("timm", []), target, clock)
            cells = []
            for tag, curve in row.items():
                t = time_to(curve, target, clock)
                ratio = f" ({t / base:.2f}x)" if t is not None and base and tag != "timm" else ""
                cells.append(f"{tag} {shown(t)}{ratio}")
            print(f"{name}: {target:.1f}% ({what}): " + ", ".join(cells), flush=True)
    for tag, curve in row.items():
        best = max((r[2] for r in curve), default=float("nan"))
        end = curve[-1] if curve else (float("nan"),) * 3
        print(f"{name}: {tag}: best {best:.2f}% in {end[0]:.0f} s wall, {end[1]:.0f} s CPU", flush=True)


def compare(a: argparse.Namespace, work: Path) -> None:
    from imgcls import machine

    bf16 = machine.cpu_has_bf16()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in a.sets:
        data = folder_of(name, work)
        classes = len([p for p in (data / "train").iterdir() if p.is_dir()])
        row: dict[str, list] = {}
        for tag, extra in [("ours", [])] + [(f"ours {v}", VARIANTS[v]) for v in a.variants]:
            row[tag] = ours(data, work / "runs" / f"{name}-{tag.replace(' ', '-')}", work / "cache", a.epochs, extra)
            if tag == "ours" and a.timm_train:
                row["timm"] = timms(Path(a.timm_train), data, work / "runs" / f"{name}-timm", a.epochs, classes, bf16)
        results[name] = {tag: curve for tag, curve in row.items()} | {
            "epochs": a.epochs, "cpus": os.cpu_count(), "columns": ["wall_s", "cpu_s", "val_acc"],
            "targets": targets(row, a.shares)}
        RESULTS.write_text(json.dumps(results, indent=1))
        report(name, row, a.shares)


def timed_steps(model, optimizer, x, y, bf16: bool, steps: int) -> float:
    """img/s of `steps` training steps after one warm-up step, in bf16 autocast or fp32."""
    import torch

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up (kernels for this precision)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return len(y) * steps / (time.perf_counter() - t)


def precision_table(a: argparse.Namespace) -> None:
    """img/s per model in bf16 autocast and in fp32 (channels_last both), alternated, a median of rounds."""
    import statistics

    import torch
    import torchvision

    torch.manual_seed(0)
    table = {}
    for name in a.models:
        model = torchvision.models.get_model(name, num_classes=10).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (64,))
        rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
        for _ in range(a.rounds):
            for kind in rates:
                rates[kind].append(timed_steps(model, optimizer, x, y, kind == "bf16", a.steps))
        bf16, fp32 = statistics.median(rates["bf16"]), statistics.median(rates["fp32"])
        table[name] = {"bf16": bf16, "fp32": fp32}
        print(f"| {name} | {bf16:.0f} | {fp32:.0f} | {bf16 / fp32:.2f}x |", flush=True)
    path = ROOT / "bench" / "results-precision.json"
    path.write_text(json.dumps({"models": table, "cpus": os.cpu_count(), "steps": a.steps, "rounds": a.rounds},
                               indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm-train", help="timm's train.py (from a clone of pytorch-image-models)")
    p.add_argument("--sets", nargs="+", default=["digits", "textures", "scenes"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--shares", nargs="+", type=float, default=[0.9, 0.95, 0.98],
                   help="time to these shares of the best accuracy every run reached")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    p.add_argument("--precision", action="store_true", help="the bf16 / fp32 table instead")
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "vgg11", "efficientnet_b0",
                                                    "regnet_y_400mf", "convnext_tiny", "squeezenet1_1"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", help="folder for the data, runs and caches (default: a new temporary one)")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.precision:
        return precision_table(a)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="imgcls-tta-"))
    compare(a, work)
    print(f"figures written to {RESULTS.relative_to(ROOT)} (runs in {work})")


if __name__ == "__main__":
    main()
