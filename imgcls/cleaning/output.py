"""What `clean.py find` writes for a person: label_issues.csv (a row per issue, with an action column to
fill in), label_issues.png (the worst ones, given vs suggested label), label_issues.html (every issue with
its picture) and label_issues.json (the data set as the job saw it, which `clean.py apply` rewrites)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imgcls import files, plots
from imgcls.cleaning.issues import Issue, label_names
from imgcls.cleaning.job import Job
from imgcls.cleaning.job import split_of as fold_split
from imgcls.cleaning.layout import COLUMNS, CSV, PAGE, PICTURE, RECORD, RECORD_VERSION
from imgcls.cleaning.oof import Predictions
from imgcls.data import demo, folders, labelfile
from imgcls.evaluation.predictor import thumbnail

COLOURS = {"label": "red", "outlier": "darkorange", "look-alike": "purple"}


def csv_rows(pred: Predictions, issues: list[Issue], sep: str) -> list[list[Any]]:
    """label_issues.csv's rows, as find_issues ranked them; the action column empty, for a person to fill."""
    return [[pred.items[i.index][0], label_names(pred, pred.items[i.index][1], sep),
             label_names(pred, i.suggested, sep), round(i.score, 4), i.kind, "", i.note] for i in issues]


def write_all(out: Path, job: Job, pred: Predictions, issues: list[Issue], sep: str, grid: int) -> None:
    """The CSV, the record, the picture and the page, in `out`."""
    from imgcls.cleaning import page

    files.write_csv(out / CSV, COLUMNS, csv_rows(pred, issues, sep))
    files.atomic_write_text(out / RECORD, json.dumps(data_record(job, pred, sep), indent=1))
    shown = worst(issues, grid)
    if shown:
        plots.save(grid_figure(pred, shown, sep), out / PICTURE)
    page.write_page(out / PAGE, job, pred, issues, sep, out / PICTURE)
    print(f"wrote {out / CSV}, {PAGE}" + (f", {PICTURE}" if shown else "") + f" and {RECORD}")


def worst(issues: list[Issue], n: int) -> list[Issue]:
    """The issues the picture shows: the surest of each kind, outliers and look-alikes a quarter each at most,
    what they leave to label issues."""
    by_kind = {k: [i for i in issues if i.kind == k] for k in ("label", "outlier", "look-alike")}
    others = [*by_kind["outlier"][:n // 4], *by_kind["look-alike"][:n // 4]]
    return [*by_kind["label"][:n - len(others)], *others][:n]


def caption(pred: Predictions, issue: Issue, sep: str) -> str:
    given = label_names(pred, pred.items[issue.index][1], sep) or "(none)"
    if issue.kind == "outlier":
        return f"outlier in {given} ({issue.score:.2f})"
    suggested = label_names(pred, issue.suggested, sep) or "(none)"
    return f"{given} -> {suggested}" + (f" ({issue.score:.0%})" if issue.kind == "label" else " (look-alike)")


def grid_figure(pred: Predictions, shown: list[Issue], sep: str) -> plots.Figure:
    return plots.image_grid([thumbnail(pred.items[i.index][0]) for i in shown], [caption(pred, i, sep) for i in shown],
                            [COLOURS[i.kind] for i in shown])


def data_record(job: Job, pred: Predictions, sep: str) -> dict[str, Any]:
    """The data set as the job saw it, for `clean.py apply`: its source, classes, label separator and every
    image with its label(s) and, where the data has its own split (a split column; train/, val/, test/
    folders), the split it is in. A data folder's own test/ images, which k-fold jobs leave aside, are kept
    too (unscored), so the corrected file holds the whole data set."""
    data = str(demo.DEMO_DIR) if job.data == "demo" else job.data
    split_of, extra = own_split(data, sep, pred.classes)
    items = [[p, [pred.classes[c] for c in y] if pred.multilabel else [pred.classes[y]], split_of.get(p)]
             for p, y in pred.items]
    known = {p for p, _ in pred.items}
    items += [[p, [pred.classes[y]], "test"] for p, y in extra if p not in known]
    first = fold_split(job.folds[0])  # files the job never trained on (unreadable, too large): named by apply
    unused = [[p, why] for p, why in first.get("skipped", []) + first.get("left_out", [])]
    return {"version": RECORD_VERSION, "job": str(job.folder.resolve()), "data": data, "label_sep": sep,
            "multilabel": pred.multilabel, "classes": pred.classes, "split_column": bool(split_of), "items": items,
            "unused": unused}


def own_split(data: str, sep: str, classes: list[str]) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """(each path's split, where the data has its own: a label file's split column, a folder's train/, val/ and
    test/; a data folder's test/ images of the job's classes, which the job left aside)."""
    if labelfile.is_label_file(data):
        try:
            return labelfile.read(data, sep, warn=False).split, []
        except Exception:  # changed since the job: the job's own view is what is kept (a flat data set)
            return {}, []
    root = Path(data)
    if not root.is_dir():
        return {}, []
    train_dir, val_dir, test_dir = folders.find_layout(root)
    if val_dir is None and test_dir is None:
        return {}, []
    walk = folders.Walk()
    where = {}
    for name, folder in (("train", train_dir), ("val", val_dir), ("test", test_dir)):
        if folder is not None:
            for p in walk.image_files(folder):
                where[os.path.abspath(p)] = name
    extra = [] if test_dir is None else [(os.path.abspath(p), classes.index(d.name)) for d in walk.subfolders(test_dir)
                                         if d.name in classes for p in walk.image_files(d)]
    return where, extra
