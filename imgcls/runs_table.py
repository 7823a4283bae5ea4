"""runs.py's table: a line per run and k-fold job found below the folders given, the best first, read from
the files a run writes (its settings, its summary or, unfinished, its metrics; a job's cv_summary.json). A
file that is damaged, or not what we wrote, leaves its run out of the table with a warning naming the file,
so that one foreign folder never hides the others."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

from imgcls import runfolder
from imgcls.errors import UsageError

COLUMNS = ("run", "data", "model", "mode", "size", "recipe", "optimizer", "lr", "epochs", "best val acc",
           "time (min)")


def table(parents: list[Path], folds: bool = False) -> list[str]:
    """The table's lines, header first: the runs found below each folder given (a run found from two of
    them once), the best first. Named by their path from the folder given, after it when there are several."""
    rows, shown = [], set()
    for parent in (p for p in parents if p.is_dir()):
        prefix = f"{parent.as_posix().rstrip('/')}/" if len(parents) > 1 else ""
        for row in collect(parent, folds, prefix):
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
    return ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)),
            *("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)]


def collect(parent: Path, folds: bool = False, prefix: str = "") -> list[dict]:
    """A line per run and k-fold job at or below `parent`, the best first; a job's folds (with `folds`)
    below it. A run is named by its path from `parent`, after `prefix`."""
    rows = []
    for run in runfolder.runs_below(parent):
        row = line(run, os.path.lexists(run / runfolder.CV_SETTINGS))
        if row is None:
            continue
        rel = run.relative_to(parent).as_posix()
        row["run"] = (prefix.rstrip("/") or run.name) if rel == "." else prefix + rel
        if folds and os.path.lexists(run / runfolder.CV_SETTINGS):
            row["folds"] = [fold | {"run": f"{row['run']}/{fold_dir.name}"} for fold_dir in runfolder.folds(run)
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
    cfg = read_json(run / runfolder.CONFIG)
    if (run / runfolder.SUMMARY).exists():
        s = read_json(run / runfolder.SUMMARY)
        acc, epochs, minutes = s.get("best_val_acc", s.get("best_val_map")), f"{s['epochs']}", \
            s.get("train_time_s", 0) / 60
        multi = "best_val_map" in s
    elif (run / runfolder.METRICS).exists():
        if not (run / runfolder.METRICS).is_file():
            raise Unreadable(f"{run / runfolder.METRICS} (not a regular file)")
        with open(run / runfolder.METRICS) as f:
            history = list(csv.DictReader(f))
        multi = bool(history) and "val_map" in history[0]
        key = "val_map" if multi else "val_acc"
        acc = max((max(float(h[key]), float(h.get(f"ema_{key}") or -1)) for h in history), default=float("nan"))
        epochs = f"{len(history)}/{cfg['epochs']} (unfinished)"
        minutes = sum(float(h["time_s"]) for h in history) / 60
    else:
        return None
    return {"run": run.name, "path": os.path.realpath(run), **settings(cfg), "epochs": epochs,
            "best val acc": score(acc, run / runfolder.SUMMARY), "time (min)": minutes, "mAP": multi}


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
    folds = read_json(job / runfolder.CV_SETTINGS).get("folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
        raise Unreadable(f"{job / runfolder.CV_SETTINGS} (no number of folds in it)")
    summaries = [runfolder.fold(job, k) / runfolder.SUMMARY for k in range(1, folds + 1)]
    done = [read_json(s) for s in summaries if s.exists()]
    cv_summary = job / runfolder.CV_SUMMARY
    if cv_summary.exists():
        cv = read_json(cv_summary)
        acc, multi = cv.get("best_val_acc", cv.get("best_val_map")), "best_val_map" in cv
        if not isinstance(acc, dict):
            raise Unreadable(f"{cv_summary} (no best accuracy in it)")
        epochs = f"{folds} folds (+-{score(acc.get('std') or 0, cv_summary):.2f})"
        best = score(acc.get("mean"), cv_summary)
    elif done:
        any_fold = job / f"{runfolder.FOLD_PREFIX}*" / runfolder.SUMMARY
        scores = [score(d.get("best_val_acc", d.get("best_val_map")), any_fold) for d in done]
        multi = "best_val_map" in done[0]
        epochs, best = f"{len(done)}/{folds} folds (unfinished)", sum(scores) / len(scores)
    else:
        return None
    # the folds' settings: the first fold's config.json, written once its run has started, holds them all
    first = read_json(runfolder.fold(job, 1) / runfolder.CONFIG)
    return {"run": job.name, "path": os.path.realpath(job), **settings(first),
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
