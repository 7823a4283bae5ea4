"""Start-up: how long each command takes to answer --help, a bad option and a missing path (answered
before torch is imported), against the time to import what a real run needs (torch, torchvision and
our library modules), the floor a run cannot go below. Median of --repeats runs each, in fresh processes.

Then whole short commands on generated photos, each as its script runs (`python train.py ...`, whose
imports are frozen for the garbage collector: config.imports_done) against the same command called
the way a test or another program calls it (config.cli, nothing frozen), in the same sitting.

    python bench/bench_startup.py
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
UNFROZEN = "import sys, config, {0}; sys.exit(config.cli({0}.main, sys.argv[1:]))"  # no script(): nothing frozen
COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "train.py --epochz 3 (a typo)": ["train.py", "--epochz", "3"],
    "train.py --data missing/": ["train.py", "--data", "missing/"],
    "eval.py --help": ["eval.py", "--help"],
    "eval.py missing/": ["eval.py", "missing/"],
    "test.py --help": ["test.py", "--help"],
    "export.py --help": ["export.py", "--help"],
    "runs.py --help": ["runs.py", "--help"],
    "dataset.py --help": ["dataset.py", "--help"],
    "dataset.py check missing/": ["dataset.py", "check", "missing/"],
}
IMPORTS = {"import torch": "import torch", "import torch, torchvision": "import torch, torchvision",
           "import training (a run's modules)": "import imgcls.training.fit",
           "import report (eval.py's and test.py's)": "import imgcls.evaluation.report"}


def seconds(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def whole_commands(repeats: int) -> dict[str, dict[str, float]]:
    """Seconds for short real commands run as scripts, and the same commands with nothing frozen."""
    from bench_train import make_photos

    data = make_photos(ROOT / "bench" / ".data" / "photos-200", 200)
    work = Path(tempfile.mkdtemp(prefix="imgcls-startup-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # (runs and caches, of no use once timed)
    os.environ["IMGCLS_CACHE"] = str(work / "cache")
    run = work / "run"
    train = ["--data", str(data), "--model", "resnet18", "--mode", "scratch", "--img-size", "64", "--epochs", "2",
             "--no-summary", "--save-interval", "0"]
    subprocess.run([sys.executable, "train.py", *train, "--out", str(run)], cwd=ROOT, check=True, capture_output=True)
    image = str(next((data / "val").rglob("*.jpg")))
    commands = {"train.py, 200 photos, 2 epochs at 64 px": ("train", [*train, "--out", str(work / "t{}")]),
                "eval.py, 40 photos": ("eval", [str(data / "val"), "--checkpoint", str(run),
                                                "--out", str(work / "e{}")]),
                "test.py, one photo": ("test", [image, "--checkpoint", str(run), "--out", str(work / "p{}")])}
    out = {}
    for name, (script, args) in commands.items():
        times = {"script": [], "unfrozen": []}
        for i in range(repeats):  # alternated, so that a slower minute of the machine hits both
            for kind, cmd in (("script", [f"{script}.py"]), ("unfrozen", ["-c", UNFROZEN.format(script)])):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, *cmd, *(a.format(f"{kind}{i}") for a in args)], cwd=ROOT,
                               check=True, capture_output=True)
                times[kind].append(time.perf_counter() - t0)
        out[name] = {kind: statistics.median(t) for kind, t in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "answers_s": {name: seconds(cmd, args.repeats) for name, cmd in COMMANDS.items()},
               "imports_s": {name: seconds(["-c", code], args.repeats) for name, code in IMPORTS.items()},
               "whole_commands_s": whole_commands(args.repeats)}
    (ROOT / "bench" / "results-startup.json").write_text(json.dumps(results, indent=1))
    floor = results["imports_s"]["import training (a run's modules)"]
    print(f"machine: {results['machine']}; median of {args.repeats} fresh processes")
    print("| command | seconds | share of a run's import time |\n|---|---|---|")
    for name, s in results["answers_s"].items():
        print(f"| `{name}` | {s:.2f} | {s / floor:.2f}x |")
    for name, s in results["imports_s"].items():
        print(f"| `{name}` | {s:.2f} | {s / floor:.2f}x |")
    print("\n| command | as a script (imports frozen) | nothing frozen | ratio |\n|---|---|---|---|")
    for name, t in results["whole_commands_s"].items():
        print(f"| {name} | {t['script']:.2f} s | {t['unfrozen']:.2f} s | {t['unfrozen'] / t['script']:.2f}x |")


if __name__ == "__main__":
    main()
