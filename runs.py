"""Compare runs: one line per run folder, best validation accuracy first.

    python runs.py                 # every run under runs/
    python runs.py ~/experiments   # another parent folder

Reads each run's config.json and summary.json (a run still going, or interrupted, shows its last
finished epoch from metrics.csv); a cross-validation job (train.py --folds K) is one line, the mean
of its folds' best val accuracy with their spread (cv_summary.json). The time is the training time of
all its sessions (resumes added). A multi-label run's column holds its best val mAP, marked "mAP".
For curves side by side: tensorboard --logdir runs (HParams tab).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from config import Parser, UsageError, cli

COLUMNS = ("run", "data", "model", "mode", "size", "recipe", "optimizer", "lr", "epochs", "best val acc",
           "time (min)")


def collect(parent: Path) -> list[dict]:
    rows = []
    for cfg_path in sorted([*parent.glob("*/config.json"), *parent.glob("*/cv.json")]):
        try:
            row = describe(cfg_path.parent) if cfg_path.name == "config.json" else describe_cv(cfg_path.parent)
        except Unreadable as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        except Exception as e:  # a damaged or foreign file of any shape: that run is left out, the table goes on
            print(f"warning: skipping {cfg_path.parent} ({e.__class__.__name__}: cannot be read)", file=sys.stderr)
            continue
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: -r["best val acc"] if r["best val acc"] == r["best val acc"] else 1e9)


MAX_FOLDS = 100_000  # a cv.json asking for more is not ours (its fold folders are looked up one by one)


class Unreadable(ValueError):
    """A run's JSON file that is damaged or not what we wrote: named, and the run left out."""


def read_json(path: Path) -> dict:
    if not path.is_file():  # (a named pipe would be waited on for ever)
        raise Unreadable(f"{path} (not a regular file)")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Unreadable(f"{path} ({e.__class__.__name__}: cannot be read)") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path} (not a JSON object)")
    return value


def describe(run: Path) -> dict | None:
    """A run's line: from summary.json when it finished, else from metrics.csv; None before its first epoch."""
    cfg = read_json(run / "config.json")
    if (run / "summary.json").exists():
        s = read_json(run / "summary.json")
        acc, epochs, minutes = s.get("best_val_acc", s.get("best_val_map")), f"{s['epochs']}", \
            s.get("train_time_s", 0) / 60
        multi = "best_val_map" in s
    elif (run / "metrics.csv").exists():
        if not (run / "metrics.csv").is_file():
            raise Unreadable(f"{run / 'metrics.csv'} (not a regular file)")
        with open(run / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        multi = bool(history) and "val_map" in history[0]
        key = "val_map" if multi else "val_acc"
        acc = max((max(float(h[key]), float(h.get(f"ema_{key}") or -1)) for h in history), default=float("nan"))
        epochs = f"{len(history)}/{cfg['epochs']} (unfinished)"
        minutes = sum(float(h["time_s"]) for h in history) / 60
    else:
        return None
    return {"run": run.name, **settings(cfg), "epochs": epochs, "best val acc": score(acc, run / "summary.json"),
            "time (min)": minutes, "mAP": multi}


def score(value: Any, source: Path) -> float:
    """A best accuracy (or mAP) read from a file: a number, or the run is left out with the file named."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{source} (no best accuracy in it)")
    return float(value)


def settings(cfg: dict) -> dict:
    """A run's settings columns, from its config.json (what the recipe chose, not only what was given)."""
    words = {"model": cfg.get("model"), "mode": cfg.get("mode"), "recipe": cfg.get("recipe", "seed"),
             "optimizer": cfg.get("optimizer")}
    if not all(isinstance(v, str) for v in words.values()):
        raise ValueError("settings of another kind")
    return {"data": Path(cfg.get("data", "-")).name, **words, "size": str(cfg.get("img_size") or "default"),
            "lr": f"{cfg['lr']:g}"}


def describe_cv(job: Path) -> dict | None:
    """A cross-validation job's line: the mean best val accuracy of its folds (and their spread), from
    cv_summary.json; before that, how many folds have finished."""
    folds = read_json(job / "cv.json").get("folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
        raise Unreadable(f"{job / 'cv.json'} (no number of folds in it)")
    summaries = [job / f"fold-{k}" / "summary.json" for k in range(1, folds + 1)]
    done = [read_json(s) for s in summaries if s.exists()]
    if (job / "cv_summary.json").exists():
        cv = read_json(job / "cv_summary.json")
        acc, multi = cv.get("best_val_acc", cv.get("best_val_map")), "best_val_map" in cv
        if not isinstance(acc, dict):
            raise Unreadable(f"{job / 'cv_summary.json'} (no best accuracy in it)")
        epochs = f"{folds} folds (+-{score(acc.get('std') or 0, job / 'cv_summary.json'):.2f})"
        best = score(acc.get("mean"), job / "cv_summary.json")
    elif done:
        scores = [score(d.get("best_val_acc", d.get("best_val_map")), job / "fold-*" / "summary.json") for d in done]
        multi = "best_val_map" in done[0]
        epochs, best = f"{len(done)}/{folds} folds (unfinished)", sum(scores) / len(scores)
    else:
        return None
    # the folds' settings: the first fold's config.json, written once its run has started, holds them all
    return {"run": job.name, **settings(read_json(job / "fold-1" / "config.json")), "epochs": epochs,
            "best val acc": best, "time (min)": sum(d.get("train_time_s", 0) for d in done) / 60, "mAP": multi}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(__doc__, prog="runs.py")
    parser.add_argument("parent", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    args = parser.parse_args(argv)
    parent = Path(args.parent)
    rows = collect(parent) if parent.is_dir() else []
    if not rows:
        raise UsageError(f"no runs in {parent}/: train one first (python train.py ...)")
    cells = [[*(r[c] for c in COLUMNS[:-2]), f"{r['best val acc']:.2f}" + (" mAP" if r["mAP"] else ""),
              f"{r['time (min)']:.1f}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
