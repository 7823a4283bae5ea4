"""`dataset.py check`'s printing: counts, imbalance, skipped files, leaks and look-alikes, per fold."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from imgcls import files
from imgcls.data import folders
from imgcls.data import split as data_split
from imgcls.data.folders import shown
from imgcls.settings import cache_root

# ----------------------------------------------------------------------------- the check command

def report(split: data_split.DataSplit, out: Callable[[str], None] = print, listing: Path | None = None) -> None:
    """Per-class counts, imbalance, what is ignored and skipped and why, and look-alikes, for people (all
    the look-alike pairs in the CSV `listing` when there are more than the screen shows)."""
    train_counts, val_counts, test_counts = split.counts(split.train), split.counts(split.val), split.counts(split.test)
    names = [shown(c) for c in split.classes]
    width = max(len(c) for c in names)
    test = f" + {len(split.test)} test (held out)" if split.test else ""
    out(f"{len(names)} classes, {len(split.train)} train + {len(split.val)} val{test} images in {shown(split.root)}")
    for name, nt, nv, ne in zip(names, train_counts, val_counts, test_counts):
        out(f"  {name:>{width}}  train {nt:6d}  val {nv:6d}" + (f"  test {ne:6d}" if split.test else ""))
    report_findings(split, [a + b + c for a, b, c in zip(train_counts, val_counts, test_counts)], split.leaks,
                    f"{len({b for _, b, _ in split.leaks})} image(s) in val/test look like train images", split.repeats,
                    out, listing)


def report_folds(splits: list[data_split.DataSplit], out: Callable[[str], None] = print,
                 listing: Path | None = None) -> None:
    """report() for k-fold cross-validation, from each fold's DataSplit as its run gets it: the images
    each fold validates on per class, and look-alikes that fall in two folds (or one in the test set),
    since the run of either fold trains on one and validates on the other."""
    first, k = splits[0], len(splits)
    names = [shown(c) for c in first.classes]
    width = max(len(c) for c in [*names, "class"])
    per_fold = [split.counts(split.val) for split in splits]
    test_counts = first.counts(first.test)
    test = f" + {len(first.test)} test (held out)" if first.test else ""
    out(f"{len(names)} classes, {len(first.train) + len(first.val)} images in {k} folds{test} in {shown(first.root)}; "
        "each fold's run validates on its fold and trains on the others")
    out(f"  {'class':>{width}}" + "".join(f"  {f'fold {f}':>7}" for f in range(1, k + 1)) +
        (f"  {'test':>7}" if first.test else ""))
    for c, name in enumerate(names):
        out(f"  {name:>{width}}" + "".join(f"  {counts[c]:7d}" for counts in per_fold) +
            (f"  {test_counts[c]:7d}" if first.test else ""))
    leaks: dict[frozenset, tuple[str, str, int]] = {}
    for split in splits:
        for leak in split.leaks:
            leaks.setdefault(frozenset(leak[:2]), leak)
    repeats = [pair for pair in first.repeats if frozenset(pair[:2]) not in leaks]  # within a fold
    report_findings(first, [sum(col) + t for col, t in zip(zip(*per_fold), test_counts)], list(leaks.values()),
                    f"{len({p for pair in leaks for p in pair})} image(s) look like an image of another fold or of the "
                    "test set", repeats, out, listing, "like an image of another fold or of the test set")


SHOWN_LEAKS, SHOWN_REPEATS = 20, 10  # look-alike pairs on the screen; the rest in a file


def lookalikes_file(root: str, cache_dir: str | None = None) -> Path:
    """Where `dataset.py check` lists every look-alike pair of a data set: the cache folder (never the data)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(root).name)[:40] or "data"
    digest = hashlib.sha1(os.fsencode(root)).hexdigest()[:10]
    return cache_root(cache_dir) / "checks" / f"look-alikes-{name}-{digest}.csv"


def write_lookalikes(path: Path, leaks: list[tuple[str, str, int]], leak_kind: str,
                     repeats: list[tuple[str, str, int]]) -> None:
    """Every look-alike pair: kind, the image, the one it looks like, the hash distance (0: the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_csv(path, ["kind", "image", "looks_like", "distance"],
                    [[kind, b, a, d] for pairs, kind in ((leaks, leak_kind), (repeats, "within a class"))
                     for a, b, d in pairs])


def report_findings(split: data_split.DataSplit, totals: list[int], leaks: list[tuple[str, str, int]], leaked: str,
                    repeats: list[tuple[str, str, int]], out: Callable[[str], None], listing: Path | None = None,
                    leak_kind: str = "like a training image") -> None:
    out(f"imbalance (largest/smallest class): {max(totals) / max(1, min(totals)):.1f}x")
    if split.ignored:
        out(f"ignored {len(split.ignored)} folder(s) by name (system clutter, see docs/data.md):")
        for path in split.ignored:
            out(f"  {shown(path)}")
    if split.not_used():
        out(f"skipping {len(split.not_used())} file(s):")
        for path, reason in split.not_used():
            out(f"  {folders.listed(path)}: {reason}")
    if leaks:
        out(f"warning: {leaked} (leakage; {len(leaks)} pair(s), perceptual hash distance in bits of 256, 0 = the "
            "same picture):")
        for a, b, d in leaks[:SHOWN_LEAKS]:
            out(f"  {shown(b)} ~ {shown(a)} ({d})")
    truncated = len(leaks) > SHOWN_LEAKS or len(repeats) > SHOWN_REPEATS
    if truncated and listing is not None:
        write_lookalikes(listing, leaks, leak_kind, repeats)
    where = f"; all {len(leaks) + len(repeats)} pairs in {shown(listing)}" if truncated and listing else ""
    if len(leaks) > SHOWN_LEAKS:
        out(f"  ... and {len(leaks) - SHOWN_LEAKS} more{where}")
    if repeats:
        out(f"hint: {len(repeats)} pair(s) of images within a class look alike (duplicates weigh twice):")
        for a, b, d in repeats[:SHOWN_REPEATS]:
            out(f"  {shown(b)} ~ {shown(a)} ({d})")
        if len(repeats) > SHOWN_REPEATS:
            out(f"  ... and {len(repeats) - SHOWN_REPEATS} more{where}")
