"""The one owner of the run folder: its file names, claiming a folder and undoing it, the `.checkpointed`
marker, finding a checkpoint, the newest run, the runs below a folder, k-fold jobs and their folds, and the
files a run writes first."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import re
from pathlib import Path

from imgcls import checkpoint, files
from imgcls.cli import typed
from imgcls.data import folders
from imgcls.data import split as data_split
from imgcls.errors import UsageError
from imgcls.settings import TrainConfig

# ----------------------------------------------------------------------------- the names of its files
# Spelled here only (tests/test_layout.py checks it): every other module names a run folder's files by these.
BEST = "best.pt"  # the best model so far (what eval.py, test.py and export.py take)
LAST = "last.pt"  # the training state, to resume from
CONFIG = "config.json"  # the settings: what makes a folder a run folder
SPLIT = "split.json"  # which images trained, validated and are held out
SKIPPED = "skipped.txt"  # the images left out, and why
METRICS = "metrics.csv"  # a line per epoch
SUMMARY = "summary.json"  # a finished run's figures
CURVES = "curves.png"
LR_FIND_PLOT, LR_FIND = "lr_find.png", "lr_find.json"  # the lr range test (--lr-find)
RESUMES = "resumes.jsonl"  # a line per resume: what changed
MODEL_SUMMARY = "model_summary.txt"
EVENTS = "events.out.tfevents.*"  # TensorBoard's, written by its SummaryWriter into the run folder
# A run folder's marker of its first checkpoint: "saving" from its first best.pt until last.pt is written,
# "saved" from then on. A folder without last.pt whose marker says saved (or, made before the marker or
# copied without dot-files, that holds a best.pt) lost its last.pt; any other was stopped before its
# first checkpoint, and --resume starts it again.
CHECKPOINTED = ".checkpointed"
LOCK = files.FolderLock.NAME  # held while a process uses the folder (files.py spells it: a lock on any folder)
# A k-fold job's folder (crossval.py) holds a run per fold, fold-1/ ... fold-K/
CV_SETTINGS = "cv.json"  # the job's settings: what marks a folder as one
CV_SUMMARY = "cv_summary.json"  # the folds compared, once all have finished
FOLD_PREFIX = "fold-"


def fold_name(k: int) -> str:
    """The k-th fold's folder name in a k-fold job (k from 1)."""
    return f"{FOLD_PREFIX}{k}"


def fold(job: Path, k: int) -> Path:
    return job / fold_name(k)


def is_fold_name(name: str) -> bool:
    return re.fullmatch(rf"{FOLD_PREFIX}\d+", name) is not None


def find(given: str | None, name: str = BEST) -> Path:
    """--checkpoint as a file, a run folder (its best.pt), or absent: the newest runs/*/best.pt.
    A path that does not exist is refused here, before anything slow starts."""
    if given:
        path = Path(given)
        path = path / name if path.is_dir() else path
        if is_cv_folder(given):
            raise UsageError(k_fold_job(Path(given), name))
        if not path.is_file():
            folder = Path(given) if Path(given).is_dir() else Path(given).parent  # job/best.pt: the job's
            if fold_folders(folder, name):  # a job's folder without its cv.json (a copy, say)
                raise UsageError(k_fold_job(folder, name))
            raise UsageError(f"{missing(Path(given), name)}: give a run folder, a .pt from one, or an exported .onnx")
        return path
    found = newest_in_runs(name, folds=True)
    if found is None:
        raise UsageError(f"no runs/*/{name} found: train a model first (python train.py) or pass --checkpoint")
    if found.parent.parent != Path("runs"):  # a fold's: the newest in runs/ is a k-fold job, not one model
        raise UsageError(f"the newest model in runs/ is a k-fold job's: {k_fold_job(found.parent.parent, name)}; "
                         "or pass --checkpoint with another run")
    return found


def is_cv_folder(path: str | Path) -> bool:
    return (Path(path) / CV_SETTINGS).is_file()


def fold_folders(job: Path, name: str = BEST) -> list[Path]:
    """The `name` files of a k-fold job's folds (fold-1/, fold-2/, ...), in fold order."""
    folds = [p for p in job.glob(f"{FOLD_PREFIX}*/{name}") if is_fold_name(p.parent.name)]
    return sorted(folds, key=lambda p: int(p.parent.name.split("-")[-1]))


def k_fold_job(job: Path, name: str) -> str:
    """A k-fold job holds a model per fold, each trained on other data: one is to be chosen."""
    folds = fold_folders(job, name)
    if not folds:
        return f"{job} is a k-fold job with no {name} yet: its folds have not finished an epoch"
    return (f"{job} is a k-fold job ({len(folds)} folds), a model per fold: give one fold's folder, e.g. "
            f"{folds[0].parent} (cv_summary.json compares them), or train on all the data without --folds")


def missing(given: Path, name: str) -> str:
    if not given.is_dir():
        return f"{given} does not exist"
    if (given / CONFIG).is_file():
        return f"{given} has no {name} yet (the run has not finished an epoch)"
    return f"{given} is not a run folder (no {name}, no config.json)"


MAX_DEPTH = 4  # how far below a folder given runs and jobs are looked for (runs.py)


def runs_below(folder: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """The run folders (config.json) and k-fold jobs' folders (cv.json) at or below `folder`, at most
    `depth` levels down; never inside one (a job's folds are its own), in hidden folders, or twice (links)."""
    found: list[Path] = []
    seen: set[str] = set()

    def walk(d: Path, level: int) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        if os.path.lexists(d / CV_SETTINGS) or os.path.lexists(d / CONFIG):
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


def folds(job: Path) -> list[Path]:
    """A k-fold job's fold folders (fold-1/, fold-2/, ...) that exist, finished or not, in fold order."""
    found = [p for p in job.glob(f"{FOLD_PREFIX}*") if is_fold_name(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def runnable(path: Path) -> Path:
    """A model eval.py and test.py can run: a .pt or an .onnx; the phone formats are refused by name."""
    fmt = {suffix: name for name, suffix in checkpoint.EXPORT_SUFFIX.items()}.get(path.suffix.lower())
    if fmt and fmt != "onnx":
        raise UsageError(f"{path} is a {fmt} export for phones: eval.py and test.py run a .pt (or its run folder) "
                         "or an .onnx")
    return path


def newest_in_runs(name: str, folds: bool = False) -> Path | None:
    """The most recently written runs/*/<name>, if any; with `folds`, k-fold jobs' folds (runs/*/fold-N/<name>)
    too."""
    found = [*Path("runs").glob(f"*/{name}"),
             *(p for job in (Path("runs").glob("*") if folds else ()) for p in fold_folders(job, name))]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def marked(folder: Path) -> str | None:
    """The run folder's CHECKPOINTED marker: "saving", "saved", or None when there is none."""
    try:
        return (folder / CHECKPOINTED).read_text().strip()
    except OSError:
        return None


def lost_its_last_pt(folder: Path) -> bool:
    marker = marked(folder)
    if marker is not None:
        return marker != "saving"
    return (folder / BEST).is_file()  # (an older run, or a copy without its dot-files, that trained)


def resume_target(resume: str, out: str | None) -> tuple[Path, Path]:
    """(run folder, its last.pt) for --resume PATH (a run folder or a checkpoint in it) or 'auto'
    (--out's, else the newest run's). A folder with neither last.pt nor config.json is refused."""
    if resume == "auto" and not out:
        last = newest_in_runs(LAST)
        if last is None:
            raise UsageError("--resume auto: no runs/*/last.pt to resume; start a run without --resume")
    elif resume == "auto" or Path(resume).is_dir():
        last = Path(out if resume == "auto" else resume) / LAST
    else:
        last = Path(resume)
    folder = last.parent
    if not last.is_file() and (last.name != LAST or not (folder / CONFIG).is_file()):
        raise UsageError(f"nothing to resume: {last} does not exist")
    if not last.is_file() and lost_its_last_pt(folder):  # not a run stopped before its first checkpoint
        raise UsageError(f"{last}, the run's training state, is gone, so it cannot be resumed: start a new run "
                         f"(--weights {typed(folder / 'best.pt')} starts from its best model), or train it again from "
                         f"the start with its options and --out {typed(folder)} --overwrite")
    return folder, last


RUN_FILES = (LAST, BEST, CONFIG, SPLIT, SKIPPED, METRICS, SUMMARY, CURVES, LR_FIND_PLOT, LR_FIND, RESUMES,
             MODEL_SUMMARY, EVENTS, CHECKPOINTED)  # what a new run (or --overwrite) removes first


# ----------------------------------------------------------------------------- run folder

@dataclasses.dataclass
class RunFolder:
    """A run folder this process holds (locked), and what it made there: undone if the start fails."""
    path: Path
    lock: files.FolderLock
    created: bool  # the folder did not exist before
    made_lock: bool  # nor did its lock file
    parents: list[Path] = dataclasses.field(default_factory=list)  # folders made above it (runs/, say)
    wrote_config: bool = False

    def undo(self) -> None:
        """A start that fails before training leaves nothing behind (and nothing that blocks a retry)."""
        if self.wrote_config:
            (self.path / CONFIG).unlink(missing_ok=True)
        if self.made_lock:
            (self.path / LOCK).unlink(missing_ok=True)
        for folder in [self.path] * self.created + self.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()


def claim_run_dir(start: Start, cfg: TrainConfig, held: contextlib.ExitStack) -> RunFolder:
    """Create (or take) the run folder and lock it for this process: never two runs in one folder.
    A default name is made unique atomically (mkdir), so runs started in the same second each get
    their own. --overwrite removes the files a run writes (and nothing else). A new run's settings
    are written at once, so that a run stopped while it checks its files is resumable."""
    run_dir, created, parents = start.run_dir, not start.run_dir.exists(), files.missing_parents(start.run_dir)
    for n in itertools.count(1) if not start.named else [1]:
        run_dir = start.run_dir if n == 1 else start.run_dir.with_name(f"{start.run_dir.name}-{n}")
        try:
            run_dir.mkdir(parents=True, exist_ok=start.named)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    made_lock = not (run_dir / LOCK).exists()
    try:
        lock = files.FolderLock(run_dir)
    except BlockingIOError:
        raise UsageError(f"{run_dir} is in use by another train.py that is still running: wait for it to end, "
                         "or choose another --out") from None
    except OSError as e:
        raise UsageError(f"cannot lock run folder {run_dir}: {e.strerror}") from None
    held.callback(lock.release)
    made = RunFolder(run_dir, lock, created or not start.named, made_lock, parents)
    try:
        files.check_run_dir(run_dir, start.in_place, cfg.overwrite)
        if not start.in_place or start.ckpt is None:  # a new run, or one started again in its folder
            for pattern in RUN_FILES:
                for old in run_dir.glob(pattern):
                    old.unlink()
        files.remove_temp_files(run_dir)  # left by a killed run; the folder is ours now
        if start.ckpt is None:
            write_config(run_dir, cfg)
            made.wrote_config = not start.in_place
    except BaseException:
        made.undo()
        raise
    return made


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    files.atomic_write_text(run_dir / CONFIG, json.dumps(dataclasses.asdict(cfg), indent=1))


def write_run_files(run_dir: Path, cfg: TrainConfig, start: Start, split: data_split.DataSplit) -> None:
    """A new run's split and skipped files; on a resume, config.json (the settings in use now) and a
    line in resumes.jsonl saying what changed."""
    if start.ckpt is None:
        split.save(run_dir / SPLIT)
        files.atomic_write_text(run_dir / SKIPPED, folders.skipped_lines(split.not_used()))
    else:
        write_config(run_dir, cfg)
        (run_dir / SUMMARY).unlink(missing_ok=True)  # it described the run as finished; written again
        line = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                "epoch": start.ckpt.epoch, "changed": start.changes}
        with open(run_dir / RESUMES, "a") as f:
            f.write(json.dumps(line) + "\n")


# ----------------------------------------------------------------------------- settings and resuming

@dataclasses.dataclass
class Start:
    """How this invocation begins: a new run, a run resumed from its last.pt (`ckpt`), or a run folder
    that was created but never checkpointed (`in_place` without `ckpt`: the run starts again there
    with its saved settings)."""
    run_dir: Path
    ckpt: checkpoint.Saved | None = None  # last.pt, viewed (checkpoint.view)
    in_place: bool = False  # the folder is this run's own (--resume)
    named: bool = True  # False: a default name under runs/, made unique when it is created
    changes: dict[str, list] = dataclasses.field(default_factory=dict)  # setting -> [saved, now] on resume
    epochs_given: bool = False
