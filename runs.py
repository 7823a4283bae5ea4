"""Compare runs: one line per run folder, best validation accuracy first.

    python runs.py                              # every run under runs/
    python runs.py ~/experiments /data/runs/r50  # several folders: parents of runs, or runs themselves
    python runs.py 'runs/*-cv*' --folds          # glob patterns; --folds: a line per fold of each k-fold job

Each folder given is a run folder, a k-fold job's folder, or a folder searched for them (up to 4 levels
down, so runs written anywhere with --out are found from a folder above them). Reads each run's
config.json and summary.json (a run still going, or interrupted, shows its last finished epoch from
metrics.csv); a cross-validation job (train.py --folds K) is one line, the mean of its folds' best val
accuracy with their spread (cv_summary.json), and with --folds each of its folds below it. The time is
the training time of all its sessions (resumes added). A multi-label run's column holds its best val
mAP, marked "mAP". For curves side by side: tensorboard --logdir runs (HParams tab).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from imgcls.cli import Parser, cli
from imgcls.errors import UsageError
from imgcls.runfolder import CV_SETTINGS as CV

COLUMNS = ("run", "data", "model", "mode", "size", "recipe", "optimizer", "lr", "epochs", "best val acc",
           "time (min)")


MAX_DEPTH = 4  # how far below a folder given runs and jobs are looked for


def find(folder: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """The run folders (config.json) and k-fold jobs' folders (cv.json) at or below `folder`, at most
    `depth` levels down; never inside one (a job's folds are its own), in hidden folders, or twice (links)."""
    found: list[Path] = []
    seen: set[str] = set()

    def walk(d: Path, level: int) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        if os.path.lexists(d / CV) or os.path.lexists(d / "config.json"):
            found.append(d)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.is_dir())
        except OSError:
            return
        for child in children:
            walk(child, level + 1)

    walk(folder, 0)
    return found


def collect(parent: Path, folds: bool = False, prefix: str = "") -> list[dict]:
    """A line per run and k-fold job at or below `parent`, the best first; a job's folds (with `folds`)
    below it. A run is named by its path from `parent`, after `prefix`."""
    rows = []
    for run in find(parent):
        row = line(run, os.path.lexists(run / CV))
        if row is None:
            continue
        rel = run.relative_to(parent).as_posix()
        row["run"] = (prefix.rstrip("/") or run.name) if rel == "." else prefix + rel
        if folds and os.path.lexists(run / CV):
            row["folds"] = [fold | {"run": f"{row['run']}/{fold_dir.name}"} for fold_dir in fold_folders(run)
                            if (fold := line(fold_dir, False)) is not None]
        rows.append(row)
    return sorted(rows, key=lambda r: -r["best val acc"] if r["best val acc"] == r["best val acc"] else 1e9)


def line(run: Path, job: bool) -> dict | None:
    """describe() or describe_cv(); a damaged or foreign file of any shape leaves that run out, named."""
    try:
        return describe_cv(run) if job else describe(run)
    except Unreadable as e:
        print(f"warning: skipping {e}", file=sys.stderr)
    except Exception as e:  # the table goes on
        print(f"warning: skipping {run} ({e.__class__.__name__}: cannot be read)", file=sys.stderr)
    return None


def fold_folders(job: Path) -> list[Path]:
    folds = [p for p in job.glob("fold-*") if re.fullmatch(r"fold-\d+", p.name) and p.is_dir()]
    return sorted(folds, key=lambda p: int(p.name.split("-")[1]))


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
    return {"run": run.name, "path": os.path.realpath(run), **settings(cfg), "epochs": epochs,
            "best val acc": score(acc, run / "summary.json"), "time (min)": minutes, "mAP": multi}


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
    return {"run": job.name, "path": os.path.realpath(job), **settings(read_json(job / "fold-1" / "config.json")),
            "epochs": epochs, "best val acc": best, "time (min)": sum(d.get("train_time_s", 0) for d in done) / 60,
            "mAP": multi}


def folders_given(patterns: list[str]) -> list[Path]:
    """The folders as given, glob patterns expanded (a name that exists is never a pattern)."""
    found: list[Path] = []
    for pattern in patterns:
        if os.path.lexists(pattern) or not glob.has_magic(pattern):
            found.append(Path(pattern))
            continue
        matches = [Path(m) for m in sorted(glob.glob(pattern)) if Path(m).is_dir()]
        if not matches:
            raise UsageError(f"no folder matches {pattern!r}")
        found += matches
    return found


def main(argv: list[str] | None = None) -> int:
    parser = Parser(__doc__, prog="runs.py")
    parser.add_argument("folders", nargs="*", default=["runs"], metavar="FOLDER", help="run folders, k-fold jobs' "
                        f"folders, or folders holding them ({MAX_DEPTH} levels deep at most), or glob patterns of "
                        "these (default: runs)")
    parser.add_argument("--folds", action="store_true", help="also a line per fold of each k-fold job, below it")
    args = parser.parse_args(argv)
    parents = folders_given(args.folders)
    rows, shown = [], set()
    for parent in (p for p in parents if p.is_dir()):
        prefix = f"{parent.as_posix().rstrip('/')}/" if len(parents) > 1 else ""
        for row in collect(parent, args.folds, prefix):
            if row["path"] not in shown:  # a run found from two folders given is one run
                shown.add(row["path"])
                rows.append(row)
    rows.sort(key=lambda r: -r["best val acc"] if r["best val acc"] == r["best val acc"] else 1e9)
    if not rows:
        where = " ".join(f"{p}/" for p in parents)
        raise UsageError(f"no runs in {where}: train one first (python train.py ...), or name the folders to look in "
                         "(python runs.py FOLDER ...)")
    lines = [r for row in rows for r in (row, *row.get("folds", []))]
    cells = [[*(r[c] for c in COLUMNS[:-2]), f"{r['best val acc']:.2f}" + (" mAP" if r["mAP"] else ""),
              f"{r['time (min)']:.1f}"] for r in lines]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
