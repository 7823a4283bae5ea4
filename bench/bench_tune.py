"""tune.py against the default recipe, on data sets this bench makes, at the same budget of wall time.

    python bench/bench_tune.py                       # digits and shapes, a budget of 20 default runs each
    python bench/bench_tune.py --sets shapes --budget 5 --epochs 2     # a quick look

For each set: one train.py run with the defaults (nothing but --mode scratch, --img-size, --epochs and a
held-out test split), timed; then tune.py with the same options and --timeout of BUDGET times that run's
wall time (its last trial may overrun it: the time is reported as measured). Each is evaluated once on
the held-out test images no trial trained on or was chosen on (digits: its own test/ folder; shapes: a
25% --test-split of a flat copy). Reported per set: the held-out test accuracy of both, their best
validation accuracy (the tuned one is the best of many, so optimistic), trials completed and pruned,
and the wall time pruning saved (the epochs pruned trials did not train, at their own pace).
Written to bench/results-tune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import synthetic  # noqa: E402


def flat_copy(folder: Path, per_class: int) -> Path:
    """A flat folder (one sub-folder per class) of links to a train/val set's images: --test-split applies."""
    flat = folder.parent / f"{folder.name}-flat"
    if flat.is_dir():
        return flat
    for cls in sorted((folder / "train").iterdir()):
        (flat / cls.name).mkdir(parents=True)
        images = sorted((folder / "train" / cls.name).iterdir()) + sorted((folder / "val" / cls.name).iterdir())
        for img in images[:per_class]:
            (flat / cls.name / f"{img.parent.parent.name}-{img.name}").symlink_to(img)
    return flat


def data_for(name: str, work: Path, per_class: int) -> tuple[str, list[str]]:
    """The --data and the options that hold out the test images."""
    if name == "digits":
        return "demo", []  # data/digits/test: the demo's own test folder
    return str(flat_copy(Path(synthetic.make(name, work)), per_class)), ["--test-split", "0.25"]


def run(cmd: list[str], log: Path) -> float:
    began = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): see {log}")
    return time.perf_counter() - began


def test_accuracy(run_dir: Path, log: Path) -> float:
    out = run_dir.parent / f"test-{run_dir.name}"
    if not (out / "metrics.json").is_file():
        run([sys.executable, "eval.py", "--checkpoint", str(run_dir), "--out", str(out)], log)
    return json.loads((out / "metrics.json").read_text())["accuracy"]


def one_set(name: str, args: argparse.Namespace, work: Path) -> dict:
    data, held_out = data_for(name, work, args.per_class)
    common = ["--data", data, "--mode", "scratch", "--model", args.model, "--img-size", str(args.img_size),
              "--epochs", str(args.epochs), "--no-summary", *held_out]
    base = work / f"{name}-default"
    default_s = run([sys.executable, "train.py", *common, "--out", str(base)], work / f"{name}-default.log")
    default = {"wall_s": default_s, "test_acc": test_accuracy(base, work / f"{name}-default-eval.log"),
               "val_acc": json.loads((base / "summary.json").read_text())["best_val_acc"]}
    print(f"{name}: default recipe {default_s:.0f} s, test {default['test_acc']:.2f}%", flush=True)
    study = work / f"{name}-study"
    tune_s = run([sys.executable, "tune.py", *common, "--study", str(study), "--trials", "1000",
                  "--timeout", str(args.budget * default_s)], work / f"{name}-tune.log")
    summary = json.loads((study / "tune_summary.json").read_text())
    tuned = {"wall_s": tune_s, "test_acc": summary["best_test"], "val_acc": summary["best_val"],
             "best_trial": summary["best_trial"], "params": summary["params"], "trials": summary["trials"],
             "pruning_saved_s": summary["pruning_saved_s"], "trials_wall_s": summary["trials_wall_s"]}
    print(f"{name}: tuned {tune_s:.0f} s, {summary['trials']}, test {tuned['test_acc']:.2f}% (default "
          f"{default['test_acc']:.2f}%), pruning saved {tuned['pruning_saved_s']:.0f} s", flush=True)
    return {"default": default, "tuned": tuned, "budget_s": args.budget * default_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes", "scenes"])
    p.add_argument("--budget", type=float, default=20.0, help="tune.py's time, in default runs' wall time")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--per-class", type=int, default=150, help="images per class of the flat copies")
    p.add_argument("--work", default="/tmp/bench-tune")
    p.add_argument("--out", default=str(ROOT / "bench" / "results-tune.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IMGCLS_CACHE", str(work / "cache"))
    results = {"settings": vars(args) | {"cpus": os.cpu_count()}}
    for name in args.sets:
        results[name] = one_set(name, args, work)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
