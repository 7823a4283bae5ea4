"""The images eval.py evaluates: a folder, a label file, or the held-out test split of the checkpoint's run;
their classes matched to the model's by name; and what the model already saw of them.

No torch here: eval.py reads the run's split.json (`RunSplit`) while it checks its command line, and the
evaluation uses that same reading, so the file is read once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imgcls import runfolder
from imgcls.data import check, folders, imagecache, labelfile, stratify
from imgcls.data import split as data_split
from imgcls.errors import UsageError
from imgcls.evaluation.result import Caveat


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """eval.py's settings for one evaluation, from its checked command line."""
    device: str
    amp: bool
    batch_size: int
    workers: int | None
    cache_dir: str | None
    max_bytes: int
    image_cache: str  # raw, compact, auto or none
    tta: bool = False
    label_sep: str | None = None  # None: the checkpoint's


@dataclass(frozen=True)
class RunSplit:
    """The split.json of the run a checkpoint is in, read once; `split` is None when there is no readable one
    (a checkpoint outside a run folder, an .onnx, a damaged or foreign file)."""
    file: Path
    split: data_split.DataSplit | None

    @classmethod
    def of(cls, checkpoint: Path) -> RunSplit:
        file = Path(checkpoint).parent / runfolder.SPLIT
        return cls(file, read_split(file))

    @property
    def folder(self) -> Path:
        return self.file.parent

    @property
    def root(self) -> str | None:
        """The data folder the run was trained on."""
        return self.split.root if self.split is not None else None


def read_split(file: Path) -> data_split.DataSplit | None:
    """A run's split.json, when it can be read and its labels are the run's classes."""
    try:
        split = data_split.DataSplit.load(file)
        n = len(split.classes)
        if all(isinstance(p, str) and all(0 <= int(c) < n for c in stratify.label_set(y))
               for p, y in split.train + split.val + split.test):
            return split
    except Exception:  # a damaged or foreign file, whatever it holds: as if there were none
        pass
    return None


def match_classes(folder_classes: list[str], model_classes: list[str]) -> list[int]:
    """Map each folder class to the model's index of the same name."""
    unknown = [c for c in folder_classes if c not in model_classes]
    if unknown:
        raise UsageError(f"the model does not know class(es) {', '.join(unknown)}; it knows: "
                         f"{', '.join(model_classes)}. Remove or rename them")
    missing = [c for c in model_classes if c not in folder_classes]
    if missing:
        imagecache.warn(f"no images of class(es) {', '.join(missing)}: the report covers the other classes")
    return [model_classes.index(c) for c in folder_classes]


def evaluation_set(data: Path | None, run: RunSplit, opts: EvalOptions, *, size: int | None, interpolation: str,
                   sep: str) -> check.Scanned:
    """The labelled images to evaluate: a folder, a label file, or the test split of the checkpoint's `run`;
    checked, and decoded into the cache of kind `opts.image_cache` (at `size`; None: no cache)."""
    scan = {"cache_size": size, "max_bytes": opts.max_bytes, "interpolation": interpolation,
            "image_cache": opts.image_cache}
    if data is not None and labelfile.is_label_file(data):
        return check.scan_labels(data, opts.cache_dir, sep=sep, **scan)
    if data is not None:
        return check.scan_folder(data, opts.cache_dir, **scan)
    split = run.split
    if split is None and run.file.exists():
        raise UsageError(f"{run.file} cannot be read: give the images to evaluate, python eval.py DATA")
    root = Path(split.root) if split is not None else None
    test_dir = folders.find_layout(root)[2] if root is not None and root.is_dir() else None
    if split is None or not (split.test or test_dir):
        raise UsageError(f"{run.folder} has no held-out test split (train with --test-split F, or give a "
                         "folder with a test/ folder): give the images to evaluate, python eval.py DATA")
    if not split.test:  # a data set root with its own test/ folder
        return check.scan_folder(root, opts.cache_dir, **scan)
    good, skipped, cache = check.check_items(split.test, "the run's test split", opts.cache_dir, progress=True,
                                             **scan)
    return split.classes, good, skipped, cache, f"the run's held-out test split ({run.file})"


def warn_if_seen(items: list[tuple[str, int]], run: RunSplit) -> list[Caveat]:
    """A warning when the images evaluated are ones the model trained on or was chosen on: then the
    accuracy is not that of new images. Returned too, for the accuracy line, metrics.json and report.html,
    which must say the same."""
    split = run.split
    if split is None:
        return []
    paths = {os.path.realpath(p) for p, _ in items}  # however the folder was named: relative, a link
    caveats = []
    for name, used, why in (("training", split.train, "it learned from"), ("validation", split.val,
                                                                        "best.pt was chosen on")):
        seen = len(paths & {os.path.realpath(p) for p, _ in used})
        if seen:
            text = (f"{seen} of the {len(paths)} images evaluated are the {name} images {why} ({run.file}): its "
                    "scores are optimistic; evaluate images the run never used (train with --test-split F to keep "
                    "some aside)")
            imagecache.warn(text)
            caveats.append(Caveat(name, why, seen, text))
    return caveats
