"""`clean.py apply`: the decisions a person marked in label_issues.csv (keep, relabel, drop) written as a new
label file that train.py --data takes. The image folders are never touched: a dropped image is left out of
the file, a relabelled one listed with its new label. No torch here: it answers in a moment."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls import files
from imgcls.cleaning.layout import ACTIONS, RECORD, RECORD_VERSION
from imgcls.cli import typed
from imgcls.data import folders
from imgcls.data.folders import shown
from imgcls.errors import UsageError

NEEDED = ("path", "suggested", "action")


@dataclass
class Decision:
    """What a row of the reviewed CSV says of its image: the action, the new label(s) for a relabel, its line."""
    action: str
    names: tuple[str, ...]
    line: int


def uncell(text: str) -> str:
    """A cell as files.csv_cell wrote it, back to the text: one leading ' off (a spreadsheet may have taken it
    off already, which reads the same)."""
    return text[1:] if text.startswith("'") else text


def read_record(folder: Path) -> dict[str, Any]:
    """label_issues.json, which `clean.py find` wrote beside the CSV: the data set as the job saw it."""
    path = folder / RECORD
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("version") == RECORD_VERSION and isinstance(record.get("items"),
                                                                                                 list):
            return record
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: give the folder clean.py find wrote with --report DIR (it holds "
                         f"{RECORD} beside label_issues.csv)") from None
    except (OSError, ValueError):
        pass
    raise UsageError(f"{path} cannot be read: run python clean.py find again")


def read_reviewed(path: Path, record: dict[str, Any], unmarked: str) -> dict[str, Decision]:
    """Each image's decision from the reviewed CSV; rows of one image must agree (keep gives way to the other
    two, relabel and drop cannot both be asked for). A row left blank counts as `unmarked`."""
    try:
        # (a name that is not UTF-8 was written as its bytes: read back as the same name, so it can be dropped)
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
        first = text.split("\n", 1)[0]  # a spreadsheet in a comma-decimal locale separates with ; (or a tab)
        lines = list(csv.reader(io.StringIO(text, newline=""), delimiter=next((d for d in ",;\t" if d in first), ",")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{shown(path)} cannot be read as a UTF-8 CSV ({e})") from None
    header = [h.strip().lower() for h in lines[0]] if lines else []
    missing = [c for c in NEEDED if c not in header]
    if missing:
        raise UsageError(f"{shown(path)} has no {', '.join(missing)} column(s): give the label_issues.csv clean.py "
                         "find wrote, with its action column filled in")
    col = {name: header.index(name) for name in NEEDED}
    known = {p for p, _, _ in record["items"]}
    decided: dict[str, Decision] = {}
    for number, fields in enumerate(lines[1:], start=2):
        if not any(f.strip() for f in fields):
            continue
        if len(fields) < len(header):
            raise UsageError(f"{shown(path)} line {number} has {len(fields)} field(s), the header {len(header)}")
        image = uncell(fields[col["path"]])
        if image not in known:
            hint = "paths as written there" if is_utf8(image) else "saved as UTF-8: a spreadsheet's 'CSV UTF-8'"
            raise UsageError(f"{shown(path)} line {number}: {shown(image)} is not an image of the data set clean.py "
                             f"find looked at: give the CSV it wrote ({hint})")
        action = uncell(fields[col["action"]]).strip().lower()
        if action and action not in ACTIONS:
            raise UsageError(f"{shown(path)} line {number}: action {fields[col['action']]!r} is not one of "
                             f"{', '.join(ACTIONS)} (or blank: {unmarked})")
        names = label_list(uncell(fields[col["suggested"]]), record)
        if not action:  # --unmarked relabel takes the suggestions there are: an outlier has none (a blank cell,
            # which for a multi-label image would otherwise read as "none of the labels")
            kind = uncell(fields[header.index("kind")]).strip().lower() if "kind" in header else ""
            none = kind == "outlier" or (not names and not record["multilabel"])
            action = "keep" if unmarked == "relabel" and none else unmarked
        if action == "relabel" and not names and not record["multilabel"]:
            raise UsageError(f"{shown(path)} line {number}: relabel needs a label in the suggested column: write the "
                             "class there, or mark the row keep or drop")
        decided[image] = merged(decided.get(image), Decision(action, names if action == "relabel" else (), number),
                                path)
    return decided


def label_list(cell: str, record: dict[str, Any]) -> tuple[str, ...]:
    """The label(s) of a suggested cell: one class, or a multi-label image's labels split as its label file's."""
    if not record["multilabel"]:
        return (cell.strip(),) if cell.strip() else ()
    sep = record.get("label_sep") or " "
    return tuple(dict.fromkeys(n.strip() for n in (cell.split() if sep == " " else cell.split(sep)) if n.strip()))


def merged(before: Decision | None, now: Decision, path: Path) -> Decision:
    if before is None or now.action == "keep" or (before.action, before.names) == (now.action, now.names):
        return before or now
    if before.action == "keep":
        return now
    raise UsageError(f"{shown(path)} lines {before.line} and {now.line} decide differently for one image "
                     f"({before.action} {' '.join(before.names)}, {now.action} {' '.join(now.names)}): make them agree")


def corrected_rows(record: dict[str, Any], decided: dict[str, Decision], out: Path
                   ) -> tuple[list[list[str]], dict[str, int]]:
    """The corrected label file's rows, in the data set's order, and what was done (counts)."""
    counts = {"kept": 0, "relabelled": 0, "dropped": 0, "gone": 0}
    sep, rows = record.get("label_sep") or " ", []
    base = os.path.abspath(out.parent)
    for path, names, split in record["items"]:
        d = decided.get(path)
        if d is not None and d.action == "drop":
            counts["dropped"] += 1
            continue
        if not os.path.isfile(path):
            counts["gone"] += 1
            continue
        relabel = d is not None and d.action == "relabel" and tuple(d.names) != tuple(names)
        counts["relabelled" if relabel else "kept"] += 1
        names = d.names if relabel else names
        check_holdable(path, sep.join(names))
        rows.append([cell_path(path, base), sep.join(names)] + ([split or "train"] if record.get("split_column")
                                                                 else []))
    return rows, counts


def cell_path(path: str, base: str) -> str:
    """A path as the label file holds it: relative to the file's folder `base` when below it, else absolute;
    labels.read strips a path cell and expands a leading ~, so a relative path starting with a space or ~
    gets ./ in front (" photos/a.png" would read as photos/a.png, "~/a.png" as one in the home folder)."""
    if not path.startswith(base + os.sep):
        return path
    relative = os.path.relpath(path, base)
    return "./" + relative if relative[:1].isspace() or relative.startswith("~") else relative


def is_utf8(text: str) -> bool:
    """Whether a name read with surrogateescape (from a folder, or the CSV) was UTF-8 on disk."""
    return text == text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_holdable(path: str, label: str) -> None:
    """An image of the corrected file as train.py will read it: a label file is UTF-8 text, a line per image,
    so a name that is not UTF-8 or holds a line break cannot be in it (answered before anything is written)."""
    for cell in (path, label):
        if not is_utf8(cell) or "\n" in cell or "\r" in cell:
            raise UsageError(f"{shown(path)}: {'its name' if cell is path else f'its label {shown(cell)!r}'} is not "
                             "UTF-8 or holds a line break, which a label file (UTF-8, a line per image) cannot hold: "
                             "drop it in the reviewed CSV, or rename it, train the job again and run clean.py find "
                             "again")


def apply(reviewed: Path, out: Path, report: Path | None = None, unmarked: str = "keep") -> int:
    record = read_record(report if report is not None else reviewed.parent)
    check_out(out, record)
    decided = read_reviewed(reviewed, record, unmarked)
    rows, counts = corrected_rows(record, decided, out)
    new = sorted({r[1] for r in rows} - set(record["classes"])) if not record["multilabel"] else \
        sorted({n for r in rows for n in r[1].split(record.get("label_sep") or " ") if n} - set(record["classes"]))
    header = ["path", "labels" if record["multilabel"] else "label"] + (["split"] if record.get("split_column") else [])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)  # as train.py reads a label file: no spreadsheet escapes, which it would take as names
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out, text.getvalue())
    print(f"wrote {shown(out)}: {len(rows)} images, {counts['relabelled']} relabelled, {counts['dropped']} dropped "
          f"(left out of the file; your image folders are unchanged), {counts['kept']} as they were")
    unused = record.get("unused", [])
    if unused:
        print(f"note: {len(unused)} file(s) of the data set the job did not use are not in it either, as train.py "
              f"skipped them: {shown(unused[0][0])} ({unused[0][1]})" + (" ..." if len(unused) > 1 else ""))
    if counts["gone"]:
        print(f"note: {counts['gone']} image(s) no longer exist and are left out")
    if new:
        print(f"note: new class(es) {', '.join(new[:5])}" + (" ..." if len(new) > 5 else ""))
    sep = record.get("label_sep") or " "
    print(f"train on it: python train.py --data {typed('./' + str(out) if str(out).startswith('-') else out)}" +
          (f" --label-sep {typed(sep)}" if record["multilabel"] and sep != " " else ""))
    return 0


def check_out(out: Path, record: dict[str, Any]) -> None:
    """A new .csv file outside the image folders: nothing is replaced, no image folder gains a file."""
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {shown(out)}: the corrected label file must end in .csv (train.py --data takes a "
                         ".csv as a label file)")
    if out.exists():
        raise UsageError(f"--out {shown(out)} already exists: give a new file name (nothing is replaced)")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {shown(out)}: {shown(out.parent)} is a file")
    folders.check_outside(record.get("data"), out, "the corrected label file")
