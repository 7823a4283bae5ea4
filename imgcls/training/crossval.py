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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from imgcls import files, runfolder
from imgcls.cli import imports_done, typed
from imgcls.errors import UsageError
from imgcls.settings import TrainConfig, file_name, identity_changes

SETTINGS, SUMMARY = runfolder.CV_SETTINGS, runfolder.CV_SUMMARY


def main(given: dict[str, Any]) -> int:
    """Every fold, then the summary; the process group (torchrun) is shared by the folds and closed at the end."""
    import torch.distributed as dist  # torch loads only here: train.py checks its command line first

    from imgcls.training.distributed import from_lead, init_distributed

    try:
        rank, _, _ = init_distributed(given.get("device", "auto"))
        parent, settings, overrides, created = from_lead(lambda: prepare(given), rank == 0)
        parent = Path(parent)
        for k in range(1, settings["folds"] + 1):
            try:
                code = run_fold(parent, k, settings, overrides)
            except UsageError:
                if rank == 0 and not given.get("resume") and k == 1 and not runfolder.fold(parent, 1).exists():
                    undo(parent, created)  # bad settings: the same command, corrected, can simply run again
                raise
            if code:
                if code == 130 and rank == 0:
                    print(f"the cross-validation job continues with: python train.py --resume {typed(parent)}",
                          file=sys.stderr)
                return code
        if rank == 0:
            summarise(parent, settings["folds"])
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def undo(parent: Path, created: bool) -> None:
    """Remove what a new job made before any fold could use it: cv.json, and its folder if made here."""
    (parent / SETTINGS).unlink(missing_ok=True)
    if created and not any(parent.iterdir()):
        parent.rmdir()


def prepare(given: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """(the parent folder, the job's settings, options given with --resume, whether the folder was made
    here): a new job's folder is made and its settings written before any fold starts."""
    if given.get("resume"):
        parent = Path(given["resume"])
        settings = read_settings(parent)
        if given.get("out") and Path(given["out"]).absolute() != parent.absolute():
            raise UsageError(f"--out cannot change on resume: the job stays in {parent}")
        overrides = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite")}
        changed = identity_changes(settings, overrides)
        if changed:
            raise UsageError(f"cannot change {', '.join(changed)} when resuming {parent}: start a new job instead")
        (parent / SUMMARY).unlink(missing_ok=True)  # written again when every fold has finished
        return str(parent), settings, overrides, False
    settings = {k: v for k, v in given.items() if k not in ("out", "overwrite")}
    if given.get("out"):
        parent = Path(given["out"])
        files.check_new_folder(parent)
        created = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        parent, created = files.claim_folder(Path("runs") / f"{file_name(given.get('model', TrainConfig.model))}-cv"
                                             f"{given['folds']}-{stamp}"), True
    files.atomic_write_text(parent / SETTINGS, json.dumps(settings, indent=1))
    print(f"cross-validation: {settings['folds']} folds in {parent}")
    return str(parent), settings, {}, created


def read_settings(parent: Path) -> dict[str, Any]:
    try:
        settings = json.loads((parent / SETTINGS).read_text())
        if isinstance(settings, dict) and int(settings["folds"]) >= 2:
            return settings
    except (OSError, ValueError, TypeError, KeyError):
        pass
    raise UsageError(f"{parent / SETTINGS} cannot be read: the job's settings are lost; start the job again "
                     "with its options")


def run_fold(parent: Path, k: int, settings: dict[str, Any], overrides: dict[str, Any]) -> int:
    """One fold: started, or resumed from its folder (a finished one says so and returns at once)."""
    from imgcls.training import fit
    imports_done()

    folder = runfolder.fold(parent, k)
    if (folder / runfolder.CONFIG).is_file():
        return fit.train({**overrides, "resume": str(folder)})
    return fit.train({**settings, **overrides, "fold": k, "out": str(folder)})


def summarise(parent: Path, folds: int) -> dict[str, Any]:
    """cv_summary.json and the printed lines: each fold's best validation accuracy and per-class accuracy
    (multi-label: mAP and per-label AP), their mean and (sample) standard deviation."""
    try:
        runs = [json.loads((runfolder.fold(parent, k) / runfolder.SUMMARY).read_text()) for k in range(1, folds + 1)]
        classes, multi = runs[0]["classes"], bool(runs[0].get("multilabel"))
        score, per = ("best_val_map", "per_label_ap") if multi else ("best_val_acc", "per_class_acc")
        best = np.array([r[score] for r in runs], dtype=float)
        # a fold that validated on no image of a class says nothing of it (NaN), rather than 0%
        per_class = np.array([[np.nan if a is None else 100 * a for a in r["val_ap"]] if multi else
                              [100 * row[i] / sum(row) if sum(row) else np.nan for i, row in
                               enumerate(r["val_confusion"])] for r in runs], dtype=float)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UsageError(f"a fold's summary.json in {parent} cannot be read ({e.__class__.__name__}): resume the "
                         f"job to write it again, python train.py --resume {typed(parent)}") from None

    def spread(values: np.ndarray) -> dict[str, float | None]:
        values = values[~np.isnan(values)]
        return {"mean": float(values.mean()) if len(values) else None,
                "std": float(values.std(ddof=1)) if len(values) > 1 else None, "folds": len(values)}

    summary = {"folds": folds, score: {**spread(best), "per_fold": best.tolist()},
               per: {c: spread(per_class[:, i]) for i, c in enumerate(classes)},
               "classes": classes, "multilabel": multi, "runs": [runfolder.fold_name(k) for k in range(1, folds + 1)]}
    files.atomic_write_text(parent / SUMMARY, json.dumps(summary, indent=1))
    print(f"cross-validation over {folds} folds: best val {'mAP' if multi else 'accuracy'} {best.mean():.2f}% +- "
          f"{best.std(ddof=1):.2f} (folds: {', '.join(f'{a:.2f}' for a in best)}); per "
          f"{'label (average precision)' if multi else 'class'}:")
    width = max(len(c) for c in classes)
    for c in classes:
        acc = summary[per][c]
        print(f"  {c:>{width}}: " + ("no fold validated on it" if acc["mean"] is None else
                                     f"{acc['mean']:.2f}%" + (f" +- {acc['std']:.2f}" if acc["std"] is not None else "")
                                     + (f" ({acc['folds']} of {folds} folds)" if acc["folds"] < folds else "")))
    print(f"wrote {parent / SUMMARY}")
    return summary
