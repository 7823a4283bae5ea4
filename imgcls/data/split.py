"""Splits: an image folder or a label file read into train, validation and test sets (DataSplit), checked
file by file, with k-fold and a held-out test share; the split a run records in split.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgcls import files
from imgcls.data import check as data_check
from imgcls.data import demo, folders, imagecache, labelfile, stratify
from imgcls.data.folders import shown
from imgcls.data.stratify import class_counts, derived_seed, fold_split, stratified_split
from imgcls.errors import UsageError


@dataclass
class DataSplit:
    """What a run trains and validates on: written to the run folder as split.json."""
    root: str
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # checked and unreadable: (path, reason)
    leaks: list[tuple[str, str, int]] = field(default_factory=list)  # (train, val or test, hash distance)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # never opened: (path, reason), folders.py
    ignored: list[str] = field(default_factory=list)  # folders ignored by name
    repeats: list[tuple[str, str, int]] = field(default_factory=list)  # look-alikes within a class
    test: list[tuple[str, int]] = field(default_factory=list)  # held out from training and model selection
    multilabel: bool = False  # a label file's `labels` column: each item's label is a tuple of label indices
    # `test` was set aside from the checked files (--test-split), so the check put it into the image cache too
    # (False in split.json files of older runs, whose cache left it out)
    test_cached: bool = False

    def save(self, path: Path) -> None:
        files.atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> DataSplit:
        d = json.loads(Path(path).read_text())
        for key in ("train", "val", "skipped", "leaks", "left_out", "repeats", "test"):
            d[key] = [tuple(x) for x in d.get(key, [])]
        if d.get("multilabel"):
            for key in ("train", "val", "test"):
                d[key] = [(p, tuple(y)) for p, y in d[key]]
        return cls(**d)

    def files(self) -> list[str]:
        """Every file that was checked, in the order the image cache stores them: the cache the check
        filled is the one training reads (one decode of each image, one cache)."""
        return sorted([p for p, _ in self.train + self.val + (self.test if self.test_cached else [])] +
                      [p for p, _ in self.skipped])

    def counts(self, items: list[tuple[str, Any]]) -> list[int]:
        """Images per class (per label: the images that have it)."""
        return class_counts(items, len(self.classes))

    def not_used(self) -> list[tuple[str, str]]:
        """Every file of the data set that is not trained or validated on, with the reason."""
        return self.left_out + self.skipped


def resolve_data_dir(data: str) -> Path:
    """'demo' or a folder; a missing or empty folder is the user's mistake, said in one line."""
    if data == "demo":
        return demo.export_demo()
    root = Path(os.path.abspath(os.path.expanduser(data)))  # split.json's paths then hold from any directory
    if not root.is_dir():
        raise UsageError(f"data folder {data} does not exist: give --data DIR with one sub-folder per class, "
                         "or --data demo")
    return root


def check_folds(items: list[tuple[str, int]], classes: list[str], folds: int, say: bool = True) -> None:
    """Every fold validates on something; a class smaller than the folds is said (some folds will not
    validate on it, and a class of one image is missing from one fold's training), with `say`: by the
    job's first fold, not again by each."""
    counts = class_counts(items, len(classes))
    if len(items) < folds:
        raise UsageError(f"--folds {folds}: only {len(items)} images to share out (after the test split): use "
                         f"--folds {max(2, len(items))} or fewer")
    small = [f"{shown(c)} ({counts[i]})" for i, c in enumerate(classes) if counts[i] < folds]
    if small and say:
        imagecache.warn(f"class(es) with fewer images than the {folds} folds: {', '.join(small)}; some folds validate "
             "without them, and their per-class scores cover only the folds that had them")


def prepare_data(data: str, val_split: float = 0.2, seed: int = 42, cache_dir: str | None = None,
                 progress: bool = True, cache_size: int | None = None,
                 max_file_mb: float = folders.DEFAULT_MAX_FILE_MB, test_split: float = 0.0,
                 folds: int = 0, fold: int = 0, label_sep: str = labelfile.DEFAULT_SEP, image_cache: str = "raw",
                 interpolation: str = "bilinear", share: data_check.Share | None = None) -> DataSplit:
    """Find classes and files (a folder, or a label file), check them all, split, look for look-alikes
    across the splits; every problem a person can fix is a UsageError. With `test_split`, a stratified
    share is set aside as the run's own test set (DataSplit.test). With `folds`, the rest is cut into
    that many stratified folds and fold number `fold` validates. With `cache_size`, also fill the
    decoded-image cache of DataSplit.files() at that size (resized with `interpolation`). With `share`
    (under torchrun), the machines check a share of the files each (check_files)."""
    walk = folders.Walk(max_bytes=int(max_file_mb * 2**20))
    train_dir = None  # a folder's training folder: another path to a training image in it is no leak
    if labelfile.is_label_file(data):
        root, classes, sets, own_split = label_file_sets(data, label_sep)
    else:
        root = resolve_data_dir(data)
        classes, sets, own_split, train_dir = folder_sets(root, walk)
    if test_split and own_split:
        raise UsageError(f"--test-split sets aside part of a flat folder or of a label file without a split column; "
                         f"{shown(root)} has its own split ({own_split}): drop --test-split")
    paths = sorted(p for name in ("train", "val") for p, _ in sets[name])
    cache = imagecache.make_cache(image_cache, paths, cache_size, cache_dir, walk.max_bytes,
                                  interpolation) if cache_size \
        else None
    checked = data_check.check_files(paths, cache_dir, progress, fill=cache, max_bytes=walk.max_bytes, share=share)
    checked.update(data_check.check_files([p for p, _ in sets["test"]], cache_dir, progress, max_bytes=walk.max_bytes,
                               share=share)
                   if sets["test"] else {})
    skipped = [(p, checked[p][0]) for name in ("train", "val") for p, _ in sets[name] if checked[p][0]]
    good = {name: [(p, y) for p, y in items if not checked[p][0]] for name, items in sets.items()}
    counts = class_counts(good["train"] + (good["val"] if folds else []), len(classes))
    empty = [shown(c) for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        raise UsageError(f"class(es) {', '.join(empty)} of {shown(root)} have no readable training images: add "
                         "images or remove the class")
    train, val = good["train"], good["val"]
    # the run's own test set: a label file's test rows, or --test-split's share. A test/ folder's classes
    # may differ from training's: eval.py reads it itself; here it only takes part in the leak check.
    test, outside = (good["test"], []) if labelfile.is_label_file(data) else ([], good["test"])
    if test_split:
        train, test = stratified_split(train, test_split, derived_seed(seed, 1))
    if folds:
        check_folds(train + val, classes, folds, say=fold == 1)
        train, val = fold_split(train + val, folds, fold, seed)
    elif not sets["val"]:
        train, val = stratified_split(train, val_split / (1 - test_split), seed)
    if not val:
        raise UsageError(f"no validation images from {shown(root)}: " + (
            "its validation images cannot be read (see python dataset.py check)" if sets["val"] else
            "too few readable images to hold any out; add images"))
    looks = {p: "sha1:" + checked[p][1] if checked[p][2] == "plain" else checked[p][2] for p in checked
             if checked[p][2]}
    held = val + test + outside
    leaks = (data_check.lookalikes([p for p, _ in train], [p for p, _ in held], looks) +
             data_check.lookalikes([p for p, _ in val], [p for p, _ in test + outside], looks) +
             linked_across(walk.aliases, [p for p, _ in train], [p for p, _ in held], train_dir))
    many = stratify.is_multilabel(sets["train"])
    within = [[p for p, _ in items] for items in (train, val)] if many else \
        [[p for p, y in items if y == c] for items in (train, val) for c in range(len(classes))]
    repeats = [pair for group in within for pair in data_check.lookalikes(group, None, looks)]
    return DataSplit(str(root), classes, train, val, skipped, leaks, walk.skipped, walk.ignored, repeats, test,
                     many, test_cached=bool(test_split))


def folder_sets(root: Path, walk: folders.Walk) -> tuple[list[str], dict[str, list[tuple[str, int]]], str, Path]:
    """(classes, the train/val/test items of a folder, its own split folders or "", and its training folder:
    the data set's root when it is split by --val-split)."""
    train_dir, val_dir, test_dir = folders.find_layout(root, walk)
    classes = [d.name for d in walk.subfolders(train_dir)]
    if not classes:
        raise UsageError(f"no class folders in {shown(train_dir)}: expected {shown(train_dir)}/<class name>/<images>")
    if len(classes) < 2:
        raise UsageError(f"only one class ({shown(classes[0])}) in {shown(train_dir)}: a classifier needs at least "
                         "two class folders")
    if val_dir is not None:
        val_classes = [d.name for d in walk.subfolders(val_dir)]
        if val_classes != classes:
            only_train = sorted(map(shown, set(classes) - set(val_classes)))
            only_val = sorted(map(shown, set(val_classes) - set(classes)))
            raise UsageError(f"train and {val_dir.name} classes differ (only in train: {only_train or '-'}; "
                             f"only in {val_dir.name}: {only_val or '-'}): make the class folders match")
    test_classes = [d.name for d in walk.subfolders(test_dir)] if test_dir else []
    data_check.claim_structure(walk, root, [(d, classes if d is not test_dir else test_classes)
                                 for d in (train_dir, val_dir, test_dir) if d is not None])
    sets = {"train": data_check.labelled(walk, train_dir, classes),
            "val": data_check.labelled(walk, val_dir, classes) if val_dir else [],
            "test": data_check.labelled(walk, test_dir, test_classes) if test_dir else []}
    own = " and ".join(f"{d.name}/" for d in (val_dir, test_dir) if d is not None)
    return classes, sets, own, train_dir


def label_file_sets(data: str, sep: str = labelfile.DEFAULT_SEP
                    ) -> tuple[Path, list[str], dict[str, list[tuple[str, Any]]], str]:
    """(the label file, its classes, its train/val/test rows, "a split column" or "")."""
    lf = labelfile.check_trainable(labelfile.read(data, sep))
    if not lf.split:
        return lf.source, lf.classes, {"train": lf.items, "val": [], "test": []}, ""
    return lf.source, lf.classes, {name: lf.rows(name) for name in labelfile.SPLITS}, "a split column"


def linked_across(aliases: list[tuple[str, str]], train: list[str], held_out: list[str],
                  train_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """Links and hard links between a training image and a held-out path (one in val/ or test/, skipped as
    the same file): the same picture (leakage). Another path to it inside the training folder is not."""
    train_set, held = set(train), set(held_out)
    inside = str(train_dir).rstrip(os.sep) + os.sep if train_dir is not None else None
    out = []
    for a, b in aliases:
        if a in train_set and b not in train_set and (inside is None or not b.startswith(inside)):
            out.append((a, b, 0))
        elif b in train_set and a in held:
            out.append((b, a, 0))
    return out
