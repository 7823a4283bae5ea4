"""k-fold cross-validation (train.py --folds K): K ordinary runs in one folder, fold-1/ ... fold-K/, each
validated on one stratified fold of the data, then the mean and spread of what they reached.

With a few hundred images one 80/20 split gives an accuracy that moves by points with the seed; the
K folds validate on every image once, and their spread says how far one number can be trusted. The
parent folder holds cv.json (the settings, for resuming) and, at the end, cv_summary.json. A
killed job resumes with `train.py --resume PARENT`: finished folds stay, the unfinished one resumes
where it stopped, the rest start.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

import files
from config import UsageError

SETTINGS = "cv.json"
SUMMARY = "cv_summary.json"


def is_cv_folder(path: str | Path) -> bool:
    return (Path(path) / SETTINGS).is_file()


def main(given: dict[str, Any]) -> int:
    """Every fold, then the summary; the process group (torchrun) is shared by the folds and closed at the end."""
    import torch.distributed as dist  # torch loads only here: train.py checks its command line first

    from engine import broadcast, init_distributed

    try:
        rank, _, _ = init_distributed()
        parent, settings, overrides = broadcast(prepare(given) if rank == 0 else None)
        for k in range(1, settings["folds"] + 1):
            code = run_fold(Path(parent), k, settings, overrides)
            if code:
                return code
        if rank == 0:
            summarise(Path(parent), settings["folds"])
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def prepare(given: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the parent folder, the job's settings, options given with --resume): a new job's folder is made and
    its settings written before any fold starts."""
    if given.get("resume"):
        parent = Path(given["resume"])
        settings = json.loads((parent / SETTINGS).read_text())
        overrides = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite")}
        if "folds" in overrides and overrides["folds"] != settings["folds"]:
            raise UsageError(f"cannot change --folds when resuming {parent}: start a new job instead")
        return str(parent), settings, overrides
    settings = {k: v for k, v in given.items() if k not in ("out", "overwrite")}
    if given.get("out"):
        parent = Path(given["out"])
        files.check_new_folder(parent)
        parent.mkdir(parents=True, exist_ok=True)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{given.get('model', 'resnet18')}-{given.get('mode', 'finetune')}-cv{given['folds']}-{stamp}"
        parent = files.claim_folder(Path("runs") / name)
    files.atomic_write_text(parent / SETTINGS, json.dumps(settings, indent=1))
    print(f"cross-validation: {settings['folds']} folds in {parent}")
    return str(parent), settings, {}


def run_fold(parent: Path, k: int, settings: dict[str, Any], overrides: dict[str, Any]) -> int:
    """One fold: started, or resumed from its folder (a finished one says so and returns at once)."""
    import training

    folder = parent / f"fold-{k}"
    if (folder / "config.json").is_file():
        return training.train({**overrides, "resume": str(folder)})
    return training.train({**settings, **overrides, "fold": k, "out": str(folder)})


def summarise(parent: Path, folds: int) -> dict[str, Any]:
    """cv_summary.json and the printed lines: each fold's best validation accuracy and per-class accuracy,
    their mean and (sample) standard deviation."""
    runs = [json.loads((parent / f"fold-{k}" / "summary.json").read_text()) for k in range(1, folds + 1)]
    classes = runs[0]["classes"]
    best = np.array([r["best_val_acc"] for r in runs])
    per_class = np.array([[100 * row[i] / max(1, sum(row)) for i, row in enumerate(r["val_confusion"])]
                          for r in runs])
    summary = {"folds": folds, "best_val_acc": {"mean": float(best.mean()), "std": float(best.std(ddof=1)),
                                                "per_fold": best.tolist()},
               "per_class_acc": {c: {"mean": float(per_class[:, i].mean()), "std": float(per_class[:, i].std(ddof=1))}
                                 for i, c in enumerate(classes)},
               "classes": classes, "runs": [f"fold-{k}" for k in range(1, folds + 1)]}
    files.atomic_write_text(parent / SUMMARY, json.dumps(summary, indent=1))
    print(f"cross-validation over {folds} folds: best val accuracy {best.mean():.2f}% +- {best.std(ddof=1):.2f} "
          f"(folds: {', '.join(f'{a:.2f}' for a in best)}); per class:")
    width = max(len(c) for c in classes)
    for c in classes:
        print(f"  {c:>{width}}: {summary['per_class_acc'][c]['mean']:.2f}% +- {summary['per_class_acc'][c]['std']:.2f}")
    print(f"wrote {parent / SUMMARY}")
    return summary
