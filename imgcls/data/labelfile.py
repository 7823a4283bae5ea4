"""Label files: a CSV naming each image's class, and optionally the split it belongs to, for data that
does not come as a folder per class (Kaggle, labelling tools).

    path,label,split
    photos/IMG_0001.jpg,cat,train
    /data/more/dog 7.png,dog,val

`path` is absolute or relative to the CSV's folder; `label` is the class name; `split` (optional) is
train, val or test. Without it, train.py splits the rows as it splits a flat folder. Every problem is
answered in one line naming the row (line numbers as an editor shows them), before anything slow.

A `labels` column instead of `label` makes a multi-label data set: each image holds all the labels in
its cell, separated by spaces (--label-sep to change), or none (an image of none of them):

    path,labels
    beach/001.jpg,sea sky people
    beach/002.jpg,
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.data.folders import shown
from imgcls.errors import UsageError

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "labels", "split")
DEFAULT_SEP = " "


def is_label_file(data: str | os.PathLike) -> bool:
    return str(data).lower().endswith(".csv")


def check_data_given(data: str, sep: str | None, default_sep: str) -> None:
    """--data as train.py and tune.py check it before torch loads: a label file's every row (the case warning
    comes with the second reading), else a folder that exists, or the demo."""
    check_sep_applies(data, sep)
    if is_label_file(data):
        check_trainable(read(data, sep if sep is not None else default_sep, warn=False))
    elif data != "demo" and not Path(data).is_dir():
        raise UsageError(f"data folder {data} {'is not a folder' if Path(data).exists() else 'does not exist'}: "
                         "give --data DIR with one sub-folder per class, a label file (.csv), or --data demo")


def check_sep_applies(data: str | os.PathLike, sep: str | None) -> None:
    """--label-sep splits a label file's labels column: given with a folder, it would silently do nothing."""
    if sep is not None and not is_label_file(data):
        raise UsageError(f"--label-sep is for a label file (.csv) with a labels column; {shown(data)} is not one: "
                         "drop --label-sep")


@dataclass
class LabelFile:
    """A read label file: absolute paths with class indices (classes sorted by name), in file order; in a
    multi-label file each image's label is the sorted tuple of its label indices."""
    source: Path
    classes: list[str]
    items: list[tuple[str, Any]]
    split: dict[str, str] = field(default_factory=dict)  # path -> train/val/test; empty without the column
    multilabel: bool = False

    def rows(self, name: str) -> list[tuple[str, Any]]:
        """The items of split `name` (train, val or test)."""
        return [(p, y) for p, y in self.items if self.split.get(p) == name]


def is_multilabel(source: str | os.PathLike) -> bool:
    """Whether a label file has a `labels` column: read from its first line only (quick, for checking
    options before anything slow); a file that cannot be read says so later, in read()."""
    try:
        with open(os.path.expanduser(source), newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "labels" in [h.strip().lower() for h in header]


def read(source: str | os.PathLike, sep: str = DEFAULT_SEP, warn: bool = True) -> LabelFile:
    """The label file at `source`, checked row by row; `sep` separates the labels of a `labels` cell.
    `warn`: say when labels differ only by case (a first check before torch loads says nothing: the
    read that follows does)."""
    if not sep:
        raise UsageError("--label-sep cannot be empty: give the character between an image's labels, e.g. ';'")
    source = Path(os.path.abspath(os.path.expanduser(source)))
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader, lines, end = csv.reader(f), [], 0
            for fields in reader:  # each record with the editor's line it starts on (quoted fields may span lines)
                lines.append((end + 1, fields))
                end = reader.line_num
    except FileNotFoundError:
        raise UsageError(f"label file {shown(source)} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"label file {shown(source)} cannot be read as a UTF-8 CSV ({e})") from None
    header = check_header(source, lines[0][1] if lines else [])
    base = source.parent
    rows: list[Row] = []
    for number, fields in lines[1:]:
        if not any(f.strip() for f in fields):
            continue  # a blank line
        rows.append(check_row(source, number, fields, header, base, sep))
    return collect(source, rows, "labels" in header, warn)


def check_header(source: Path, header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    where = f"label file {shown(source)}"
    if not any(names):
        raise UsageError(f"{where} is empty: its first line names the columns, path,label (and optionally split)")
    unknown = [h for h in names if h not in COLUMNS]
    if unknown:
        raise UsageError(f"{where} has unknown column(s) {', '.join(map(repr, unknown))}: the columns are path, "
                         "label (or labels, for several per image) and (optionally) split")
    twice = sorted({h for h in names if names.count(h) > 1})
    if twice:
        raise UsageError(f"{where} names column(s) {', '.join(twice)} twice")
    if "label" in names and "labels" in names:
        raise UsageError(f"{where} has both a label and a labels column: keep label for one class per image, or "
                         "labels for several (multi-label)")
    if "path" not in names or not {"label", "labels"} & set(names):
        missing = "path" if "path" not in names else "label"
        raise UsageError(f"{where} has no {missing} column: its first line must name the columns, path,label "
                         "(or path,labels for several per image; and optionally split)")
    return {name: k for k, name in enumerate(names)}


Row = tuple[int, str, tuple[str, ...], "str | None"]  # (line, absolute path, label names, split)


def check_row(source: Path, number: int, fields: list[str], header: dict[str, int], base: Path,
              sep: str = DEFAULT_SEP) -> Row:
    where = f"{shown(source)} line {number}"
    if len(fields) != len(header):
        if any("\n" in f for f in fields):
            raise UsageError(f"{where} opens a quote (\") that is not closed on its line: close it, or remove it")
        raise UsageError(f"{where} has {len(fields)} field(s), the header {len(header)}: quote a value that "
                         "holds a comma")
    path = fields[header["path"]].strip()
    column = "labels" if "labels" in header else "label"
    if "\n" in path or "\n" in fields[header[column]].strip():  # the rest of the file, swallowed
        raise UsageError(f"{where} holds a path or label over several lines (a line break inside quotes, or a quote "
                         "(\") opened there and not closed, which takes in the lines after it): put each on one line")
    if "labels" in header:  # several per image, or none
        cell = fields[header["labels"]]
        names = tuple(dict.fromkeys(n.strip() for n in (cell.split() if sep == " " else cell.split(sep))
                                    if n.strip()))
    else:
        names = (fields[header["label"]].strip(),)
    if not path or ("label" in header and not names[0]):  # an empty labels cell: an image of none of them
        raise UsageError(f"{where} has an empty {'path' if not path else 'label'}")
    split = fields[header["split"]].strip().lower() if "split" in header else None
    if split is not None and split not in SPLITS:
        raise UsageError(f"{where}: split {fields[header['split']]!r} is not one of {', '.join(SPLITS)}")
    full = os.path.abspath(os.path.join(base, os.path.expanduser(path)))
    return number, full, names, split


def collect(source: Path, rows: list[Row], multilabel: bool = False, warn: bool = True) -> LabelFile:
    """Every path once, every path there; a warning (unless not `warn`) for labels that differ by case."""
    first: dict[str, int] = {}
    for number, path, _, _ in rows:
        if path in first:
            raise UsageError(f"{shown(source)} lines {first[path]} and {number} both list {shown(path)}: keep one")
        first[path] = number
    missing = [(number, path) for number, path, _, _ in rows if not os.path.isfile(path)]
    if missing:
        number, path = missing[0]
        what = "is a folder, not an image" if os.path.isdir(path) else "does not exist"
        more = f" (and {len(missing) - 1} more line(s) name files that are not there)" if len(missing) > 1 else ""
        raise UsageError(f"{shown(source)} line {number}: {shown(path)} {what}{more}")
    classes = sorted({name for _, _, names, _ in rows for name in names})
    folded: dict[str, list[str]] = {}
    for c in classes:
        folded.setdefault(c.casefold(), []).append(c)
    alike = [" and ".join(names) for names in folded.values() if len(names) > 1]
    if alike and warn:
        print(f"warning: labels that differ only by case are different classes: {'; '.join(alike[:3])}"
              + (" ..." if len(alike) > 3 else ""), file=sys.stderr)
    index = {c: i for i, c in enumerate(classes)}
    items = [(path, tuple(sorted(index[n] for n in names)) if multilabel else index[names[0]])
             for _, path, names, _ in rows]
    split = {path: s for _, path, _, s in rows if s is not None}
    return LabelFile(source, classes, items, split, multilabel)


def check_trainable(lf: LabelFile) -> LabelFile:
    """What training needs of a label file beyond what evaluating needs: two classes (labels) or more,
    and train rows when it has a split column."""
    if len(lf.classes) < 2:
        what = "label(s)" if lf.multilabel else "class(es)"
        raise UsageError(f"label file {shown(lf.source)} names {len(lf.classes)} {what} "
                         f"({', '.join(lf.classes) or 'none'}): a classifier needs at least two")
    if lf.split and not any(s == "train" for s in lf.split.values()):
        raise UsageError(f"label file {shown(lf.source)} has a split column with no train rows")
    return lf
