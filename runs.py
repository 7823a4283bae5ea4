"""Compare runs: one line per run folder, best validation accuracy first.

    python runs.py                 # every run under runs/
    python runs.py ~/experiments   # another parent folder

Reads each run's config.json and summary.json (a run still going, or interrupted, shows its last
finished epoch from metrics.csv). For curves side by side: tensorboard --logdir runs (HParams tab).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from config import UsageError, cli

COLUMNS = ("run", "model", "mode", "optimizer", "lr", "epochs", "best val acc", "time (min)")


def collect(parent: Path) -> list[dict]:
    rows = []
    for cfg_path in sorted(parent.glob("*/config.json")):
        run = cfg_path.parent
        cfg = json.loads(cfg_path.read_text())
        summary_path = run / "summary.json"
        if summary_path.exists():
            s = json.loads(summary_path.read_text())
            acc, epochs, minutes = s["best_val_acc"], f"{s['epochs']}", s.get("train_time_s", 0) / 60
        elif (run / "metrics.csv").exists():
            history = list(csv.DictReader(open(run / "metrics.csv")))
            acc = max((float(h["val_acc"]) for h in history), default=float("nan"))
            epochs = f"{len(history)}/{cfg['epochs']} (unfinished)"
            minutes = sum(float(h["time_s"]) for h in history) / 60
        else:
            continue
        rows.append({"run": run.name, "model": cfg["model"], "mode": cfg["mode"], "optimizer": cfg["optimizer"],
                     "lr": f"{cfg['lr']:g}", "epochs": epochs, "best val acc": acc, "time (min)": minutes})
    return sorted(rows, key=lambda r: -r["best val acc"] if r["best val acc"] == r["best val acc"] else 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parent", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    args = parser.parse_args(argv)
    parent = Path(args.parent)
    rows = collect(parent) if parent.is_dir() else []
    if not rows:
        raise UsageError(f"no runs in {parent}/: train one first (python train.py ...)")
    cells = [[r["run"], r["model"], r["mode"], r["optimizer"], r["lr"], r["epochs"], f"{r['best val acc']:.2f}",
              f"{r['time (min)']:.1f}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
