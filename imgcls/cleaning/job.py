"""A finished k-fold job (train.py --folds K) as label cleaning reads it: each fold's best.pt and the images
it validated on (its split.json). Checked without torch, so that a job that cannot be used is answered in
one line before anything slow starts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls import runfolder
from imgcls.cli import typed
from imgcls.errors import UsageError
from imgcls.training import crossval


@dataclass
class Job:
    """A k-fold job's folder, its settings (cv.json) and its folds' folders, in fold order."""
    folder: Path
    settings: dict[str, Any]
    folds: list[Path]

    @property
    def data(self) -> str:
        return str(self.settings.get("data", "demo"))


def read_job(given: str | Path) -> Job:
    """The job at `given` (its folder, or a fold's folder: its job's), every fold finished and readable."""
    folder = Path(given)
    if not folder.is_dir():
        raise UsageError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}: give the folder of a "
                         "k-fold job (python train.py --data DATA --folds 5 --out runs/NAME)")
    if not runfolder.is_cv_folder(folder) and runfolder.is_cv_folder(folder.resolve().parent):
        folder = folder.resolve().parent  # a fold's folder: its job
    if not runfolder.is_cv_folder(folder):
        raise UsageError(f"{folder} is not a k-fold job (no {runfolder.CV_SETTINGS}): label issues need a prediction "
                         "for every image from a model that never saw it; train one with python train.py --data DATA "
                         "--folds 5 --out runs/NAME")
    settings = crossval.read_settings(folder)
    folds = [runfolder.fold(folder, k) for k in range(1, int(settings["folds"]) + 1)]
    for fold in folds:
        if not (fold / runfolder.BEST).is_file() or not (fold / runfolder.SPLIT).is_file():
            raise UsageError(f"{fold.name} of {folder} has not finished (no best.pt or split.json): finish the job "
                             f"first, python train.py --resume {typed(folder)}")
    return Job(folder, settings, folds)


def split_of(fold: Path) -> dict[str, Any]:
    """A fold's split.json as JSON (dataset.DataSplit reads it with torch loaded)."""
    try:
        split = json.loads((fold / runfolder.SPLIT).read_text())
        if isinstance(split, dict) and isinstance(split.get("val"), list) and isinstance(split.get("classes"), list):
            return split
    except (OSError, ValueError):
        pass
    raise UsageError(f"{fold / runfolder.SPLIT} cannot be read: it says which images the fold validated on; train the "
                     "job again")
