"""Start-up: how long each command takes to answer --help, a bad option and a missing path (answered
before torch is imported), against the time to import what a real run needs (torch, torchvision and
our library modules), the floor a run cannot go below. Median of --repeats runs each, in fresh processes.

    python bench/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
           "import training (a run's modules)": "import training",
           "import report (eval.py's and test.py's)": "import report"}


def seconds(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "answers_s": {name: seconds(cmd, args.repeats) for name, cmd in COMMANDS.items()},
               "imports_s": {name: seconds(["-c", code], args.repeats) for name, code in IMPORTS.items()}}
    (ROOT / "bench" / "results-startup.json").write_text(json.dumps(results, indent=1))
    floor = results["imports_s"]["import training (a run's modules)"]
    print(f"machine: {results['machine']}; median of {args.repeats} fresh processes")
    print("| command | seconds | share of a run's import time |\n|---|---|---|")
    for name, s in results["answers_s"].items():
        print(f"| `{name}` | {s:.2f} | {s / floor:.2f}x |")
    for name, s in results["imports_s"].items():
        print(f"| `{name}` | {s:.2f} | {s / floor:.2f}x |")


if __name__ == "__main__":
    main()
