"""`clean.py find`: a finished k-fold job's out-of-fold predictions (oof.py), the issues cleanlab finds in
them (issues.py), and the report a person acts on (output.py, page.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from imgcls.cleaning.issues import KINDS, Issue, find_issues, label_names
from imgcls.cleaning.job import Job
from imgcls.cleaning.oof import Predictions, out_of_fold
from imgcls.cleaning.output import write_all

SHOWN = 10  # issues of each kind printed; all are in the CSV


def find(job: Job, out: Path, filter_by: str = "prune_by_noise_rate", grid: int = 24, device: str = "auto",
         batch_size: int = 256, workers: int | None = None, cache_dir: str | None = None,
         max_bytes: int | None = None) -> int:
    from imgcls.data import imagecache
    from imgcls.data import images as image_files

    max_bytes = max_bytes or image_files.MAX_BYTES
    pred = out_of_fold(job, device, batch_size, workers, cache_dir, max_bytes)
    unreadable = int((~pred.readable).sum())
    if unreadable:
        imagecache.warn(f"{unreadable} image(s) of the job cannot be read now: they are not judged")
    issues = find_issues(pred, filter_by, cache_dir, max_bytes)
    sep = str(job.settings.get("label_sep") or " ")
    print_issues(pred, issues, sep)
    write_all(out, job, pred, issues, sep, grid)
    return 0


def print_issues(pred: Predictions, issues: list[Issue], sep: str) -> None:
    counts, scored = Counter(i.kind for i in issues), int(pred.readable.sum())
    print(f"{scored} images judged by models that never trained on them: {counts['label']} label issue(s) "
          f"({100 * counts['label'] / max(1, scored):.1f}%), {counts['outlier']} outlier(s), {counts['look-alike']} "
          "look-alike(s) across classes")
    for kind in KINDS:
        mine = [i for i in issues if i.kind == kind]
        for i in mine[:SHOWN]:
            path, given = pred.items[i.index]
            suggested = label_names(pred, i.suggested, sep)
            print(f"  {kind}: {path}: {label_names(pred, given, sep) or '(none)'}"
                  + (f" -> {suggested or '(none)'}" if kind != "outlier" else "") + f" ({i.score:.3f})")
        if len(mine) > SHOWN:
            print(f"  ... and {len(mine) - SHOWN} more {kind} issue(s)")


def flagged(issues: list[Issue], kind: str = "label") -> np.ndarray:
    """The indices of the images with an issue of `kind` (for measuring against planted ones)."""
    return np.array(sorted({i.index for i in issues if i.kind == kind}), dtype=np.int64)
