"""One trial: an ordinary train.py run in its own folder, started as a child process (a `torchrun`
job with --launcher), whose validation score is read from the run's metrics.csv after each epoch and
reported to the study. A trial the pruner gives up on is stopped as Ctrl-C stops a run: train.py
saves last.pt where it is, so the folder stays a run that `train.py --resume` continues and eval.py
evaluates (best.pt is the best epoch so far); it has no summary.json, as any interrupted run.

A child process rather than training.main in this one: a run's memory, threads and CUDA state end
with it, a crash in one trial cannot take the study down, torchrun works unchanged, and no hook is
needed in training (metrics.csv is rewritten atomically after every epoch)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from imgcls import runfolder
from imgcls.errors import UsageError

POLL_S = 0.5
STOP_WAIT_S = 120  # how long a stopped run may take to save before it is terminated


@dataclasses.dataclass
class Outcome:
    """How a trial ended: complete (value: its best validation score), pruned (value: its last), failed."""
    state: str
    value: float | None
    epochs: int  # epochs it trained (all its sessions)
    wall_s: float  # this session's wall time
    saved_s: float = 0.0  # pruned: the estimated wall time of the epochs it did not train
    note: str = ""


def train_words(settings: dict[str, Any]) -> list[str]:
    """train.py's options for these settings (as config.command_line writes them, without quoting)."""
    words: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif key == "image_cache" and value == "none":
            words.append("--no-image-cache")
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    return words


def scores(folder: Path) -> list[float]:
    """Each finished epoch's validation score, as training chooses best.pt: accuracy (multi-label: mAP),
    or the weights' average's (--ema) where that is better."""
    try:
        with open(folder / runfolder.METRICS, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for row in rows:
        values = [float(row[k]) for k in ("val_acc", "val_map", "ema_val_acc", "ema_val_map") if row.get(k)]
        out.append(max(values))
    return out


def die_with_parent() -> None:  # pragma: no cover (runs in the child, between fork and exec)
    """Linux: the run is sent SIGTERM (which it takes as Ctrl-C: it saves) if tune.py dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def command(train_py: Path, launcher: list[str], settings: dict[str, Any], folder: Path) -> list[str]:
    """The run's command: a new run in `folder`, or the continuation of the one there (a retried trial)."""
    start = launcher or [sys.executable]
    if (folder / runfolder.CONFIG).is_file():
        return [*start, str(train_py), "--resume", str(folder)]
    debris = folder.is_dir() and any(folder.iterdir())  # a start killed before it wrote its settings
    return [*start, str(train_py), *train_words(settings), "--out", str(folder), *(["--overwrite"] if debris else [])]


def stop(proc: subprocess.Popen) -> None:
    """As Ctrl-C stops a run (it saves last.pt), then harder if it does not end."""
    for sig, wait in ((signal.SIGINT, STOP_WAIT_S), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(trial: optuna.Trial, cmd: list[str], folder: Path, log: Path, epochs: int,
        store: optuna.storages.RDBStorage) -> Outcome:
    """Start the run and follow it to its end or its pruning; Ctrl-C (KeyboardInterrupt) stops the run
    as Ctrl-C would have, and is raised again."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began, arrived, reported, beat = time.monotonic(), [], 0, 0.0
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                process_group=0, preexec_fn=die_with_parent if sys.platform == "linux" else None)
        trial.set_user_attr("child", proc.pid)  # a retry waits for it to have saved
        try:
            while True:
                code = proc.poll()
                values = scores(folder)
                for epoch, value in enumerate(values[reported:], start=reported + 1):
                    arrived.append(time.monotonic())
                    trial.report(value, epoch)
                    reported = epoch
                    if epoch < epochs and code is None and trial.should_prune():
                        stop(proc)
                        return pruned(values[:epoch], epochs, began, arrived)
                if code is not None:
                    return ended(code, folder, values, time.monotonic() - began, log)
                if time.monotonic() - beat >= 5:
                    store.record_heartbeat(trial._trial_id)
                    beat = time.monotonic()
                time.sleep(POLL_S)
        except BaseException:
            stop(proc)
            raise


def pruned(values: list[float], epochs: int, began: float, arrived: list[float]) -> Outcome:
    """The epochs not trained, at the pace this run had (the median time between its epochs)."""
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    pace = statistics.median(gaps) if gaps else arrived[-1] - began
    wall = time.monotonic() - began
    return Outcome("pruned", values[-1], len(values), wall, saved_s=pace * (epochs - len(values)),
                   note=f"pruned after epoch {len(values)}")


def ended(code: int, folder: Path, values: list[float], wall: float, log: Path) -> Outcome:
    """A run that ended by itself: finished (its best score), diverged (its best before that: a setting
    that trains badly, for the search to learn from), or failed."""
    try:
        summary = json.loads((folder / runfolder.SUMMARY).read_text())
    except (OSError, ValueError):
        summary = {}
    best = summary.get("best_val_acc", summary.get("best_val_map"))
    if code == 0 and best is not None:
        return Outcome("complete", float(best), int(summary.get("epochs", len(values))), wall)
    if summary.get("stopped") == "diverged" and values:
        return Outcome("complete", max(values), len(values), wall, note="diverged")
    if code == 2:  # the settings were refused: the same would happen to every trial
        raise UsageError(f"train.py refused the trial's settings: {last_line(log)} (see {log})")
    if code == 130:
        raise KeyboardInterrupt  # stopped from outside (SIGTERM, a machine going down): continued later
    return Outcome("failed", None, len(values), wall, note=f"train.py ended with status {code}: {last_line(log)}")


def last_line(log: Path) -> str:
    try:
        lines = [s.strip() for s in log.read_text(errors="replace").splitlines() if s.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"
