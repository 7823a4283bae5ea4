"""clean.py: label issues, outliers and look-alikes across classes from a k-fold job's out-of-fold
predictions, the report a person acts on, and their decisions applied as a corrected label file."""

from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, call, make_folder, make_image, make_labelled_set, train_args

pytest.importorskip("cleanlab", reason="clean.py needs cleanlab: pip install -r requirements-clean.txt")

import clean
import train
from imgcls.data import labelfile

ODD = "-red <b>&$'"  # a class name a spreadsheet would run as a formula and a page would read as markup
CLASSES = {"blue": (30, 60, 220), "green": (40, 200, 60), ODD: (220, 40, 40)}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """3 colours x 14 images, with planted issues: a red image filed as blue, a green one as red and a blue one
    as green (wrong labels: one per class, none backed by a twin that teaches its wrong label to the folds
    that judge it: with two reds as blue, one of them was missed with one thread), a grey checkerboard among
    the greens (an outlier) and a copy of a green image among the blues (the same picture labelled twice).
    Returns the folder and {planted path: its kind}."""
    root = make_folder(tmp_path_factory.mktemp("noisy"), per_class=14, classes=CLASSES)
    planted = {}
    for k, (colour, folder) in enumerate([(CLASSES[ODD], "blue"), (CLASSES["green"], ODD), (CLASSES["blue"], "green")]):
        path = root / folder / f"flipped_{k}.png"
        make_image(colour, seed=9000 + k).save(path)
        planted[str(path)] = "label"
    checker = np.indices((32, 32)).sum(0) // 4 % 2 * 255
    path = root / "green" / "checker.png"
    from PIL import Image
    Image.fromarray(np.stack([checker] * 3, -1).astype(np.uint8)).save(path)
    planted[str(path)] = "outlier"
    shutil.copy(root / "green" / "green_003.png", root / "blue" / "copy_of_green.png")
    planted[str(root / "blue" / "copy_of_green.png")] = "look-alike"
    return root, planted


@pytest.fixture(scope="module")
def job(noisy, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean") / "job"
    assert train.main(train_args(noisy[0], folder, "--mode", "scratch", "--folds", "3", "--test-split", "0.15",
                                 "--epochs", "3", "--optimizer", "adam", "--lr", "0.001", "--hflip", "0",
                                 "--warmup-epochs", "0")) == 0  # (a warm-up epoch is a weak best model)
    return folder


@pytest.fixture(scope="module")
def found(job) -> Path:
    assert call(clean.main, ["find", str(job)]) == 0
    return job / "label-issues"


def rows(report: Path) -> list[dict[str, str]]:
    with open(report / "label_issues.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def kinds(report: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows(report):
        out.setdefault(r["kind"], set()).add(r["path"])
    return out


def test_the_planted_wrong_labels_are_found_with_the_class_they_belong_to(found, noisy):
    by_path = {r["path"]: r for r in rows(found) if r["kind"] == "label"}
    for path, kind in noisy[1].items():
        if kind == "label":
            assert path in by_path, path
    suggested = {by_path[p]["suggested"] for p in noisy[1] if noisy[1][p] == "label"}
    assert suggested == {"'" + ODD, "green", "blue"}  # (the odd name as a spreadsheet-safe cell)


def test_a_picture_unlike_every_class_is_an_outlier(found, noisy):
    checker = next(p for p, kind in noisy[1].items() if kind == "outlier")
    outliers = [r for r in rows(found) if r["kind"] == "outlier"]
    assert outliers and outliers[0]["path"] == checker  # the surest one


def test_the_same_picture_in_two_classes_is_a_look_alike_pair(found, noisy):
    copy = next(p for p, kind in noisy[1].items() if kind == "look-alike")
    assert kinds(found)["look-alike"] == {copy, str(noisy[0] / "green" / "green_003.png")}


def test_every_image_is_judged_the_test_split_by_every_fold(job):
    from imgcls.cleaning.job import read_job
    from imgcls.cleaning.oof import out_of_fold

    pred = out_of_fold(read_job(job), progress=False)
    assert pred.readable.all() and len(pred.items) == 3 * 14 + 5
    test = json.loads((job / "fold-1" / "split.json").read_text())["test"]
    assert sorted(p for p, _ in test) == sorted(p for (p, _), k in zip(pred.items, pred.held_by) if k == 0)
    assert np.allclose(pred.probs.sum(1), 1, atol=1e-4)


def test_a_second_find_reads_the_predictions_from_the_cache(job, found, tmp_path, capsys):
    assert call(clean.main, ["find", str(job), "--out", str(tmp_path / "again")]) == 0
    assert "from the cache" in capsys.readouterr().out
    assert rows(tmp_path / "again") == rows(found)


def test_the_page_and_the_picture_show_the_issues_with_every_name_escaped(found):
    page = (found / "label_issues.html").read_text()
    assert "-red &lt;b&gt;&amp;$&#x27;" in page and "<b>&" not in page
    assert "Content-Security-Policy" in page and "<script" not in page
    assert page.count("data:image/jpeg;base64,") >= 5 and (found / "label_issues.png").stat().st_size > 1000


def review(report: Path, out: Path, decide) -> Path:
    """label_issues.csv with its action column filled in by `decide(row)`, written as `out`."""
    with open(report / "label_issues.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    action = table[0].index("action")
    for line in table[1:]:
        line[action] = decide(dict(zip(table[0], line)))
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(table)
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_apply_relabels_and_drops_into_a_new_label_file_and_leaves_the_images_alone(found, noisy, tmp_path):
    before = snapshot(noisy[0])
    checker = next(p for p, kind in noisy[1].items() if kind == "outlier")
    reviewed = review(found, tmp_path / "reviewed.csv",
                      lambda r: "drop" if r["path"] == checker else "relabel" if r["kind"] == "label" else "")
    out = tmp_path / "fixed" / "labels.csv"
    assert call(clean.main, ["apply", str(reviewed), "--report", str(found), "--out", str(out)]) == 0
    lf = labelfile.check_trainable(labelfile.read(out))  # what train.py --data reads first
    given = {p: lf.classes[y] for p, y in lf.items}
    for path, kind in noisy[1].items():
        if kind == "label":
            assert given[path] != Path(path).parent.name  # relabelled
        if kind == "outlier":
            assert path not in given  # dropped
    assert ODD in lf.classes and len(given) == 3 * 14 + 5 - 1
    assert snapshot(noisy[0]) == before


def test_a_row_left_blank_counts_as_what_unmarked_says(found, tmp_path):
    reviewed = review(found, tmp_path / "reviewed.csv", lambda r: "")
    out = tmp_path / "labels.csv"
    assert call(clean.main, ["apply", str(reviewed), "--report", str(found), "--out", str(out),
                             "--unmarked", "drop"]) == 0
    assert len(labelfile.read(out).items) == 3 * 14 + 5 - len({r["path"] for r in rows(found)})


def test_conflicting_decisions_for_one_image_are_refused_and_nothing_is_written(found, noisy, tmp_path, capsys):
    copy = next(p for p, kind in noisy[1].items() if kind == "look-alike")
    reviewed = review(found, tmp_path / "reviewed.csv",
                      lambda r: ("drop" if r["kind"] == "look-alike" else "relabel") if r["path"] == copy else "")
    out = tmp_path / "labels.csv"
    if sum(r["path"] == copy for r in rows(found)) < 2:
        pytest.skip("the copy was flagged once only")
    assert call(clean.main, ["apply", str(reviewed), "--report", str(found), "--out", str(out)]) == 2
    assert "decide differently for one image" in capsys.readouterr().err and not out.exists()


def test_an_action_that_is_none_of_keep_relabel_drop_names_its_line(found, tmp_path, capsys):
    reviewed = review(found, tmp_path / "reviewed.csv", lambda r: "fix")
    assert call(clean.main, ["apply", str(reviewed), "--report", str(found), "--out", str(tmp_path / "l.csv")]) == 2
    err = capsys.readouterr().err
    assert "line 2: action 'fix' is not one of keep, relabel, drop" in err and len(err.strip().splitlines()) == 1


def test_a_multilabel_job_gets_label_sets_suggested_and_a_labels_column_back(tmp_path):
    data = make_labelled_set(tmp_path / "objects", 30, seed=3)
    job = tmp_path / "job"
    assert train.main(train_args(data, job, "--mode", "scratch", "--folds", "2", "--hflip", "0")) == 0
    assert call(clean.main, ["find", str(job), "--out", str(tmp_path / "report")]) == 0
    out = tmp_path / "fixed.csv"
    reviewed = review(tmp_path / "report", tmp_path / "reviewed.csv", lambda r: "relabel")
    assert call(clean.main, ["apply", str(reviewed), "--report", str(tmp_path / "report"), "--out", str(out)]) == 0
    lf = labelfile.read(out)
    assert lf.multilabel and len(lf.items) == 30


def test_a_missing_label_is_named_as_missing_and_added_to_the_suggestion():
    from imgcls.cleaning.issues import multilabel_issues
    from imgcls.cleaning.oof import Predictions

    rng = np.random.default_rng(0)
    truth = [tuple(sorted(rng.choice(3, 2, replace=False).tolist())) for _ in range(60)]
    probs = np.full((60, 3), 0.03)
    for i, y in enumerate(truth):
        probs[i, list(y)] = 0.97
    given = list(truth)
    given[7] = truth[7][:1]  # one label left out of image 7
    pred = Predictions([(f"{i}.png", y) for i, y in enumerate(given)], ["a", "b", "c"], True, np.ones(60, int), probs)
    found = multilabel_issues(pred, np.arange(60), probs, "prune_by_noise_rate")
    assert [i.index for i in found] == [7] and found[0].suggested == truth[7]
    assert found[0].note.startswith(f"missing: {'abc'[truth[7][1]]}")


def run_script(*args: str) -> subprocess.CompletedProcess:
    """clean.py as a command, reporting whether torch was imported by the time it exited."""
    code = (f"import runpy, sys\nsys.argv = ['clean.py', *{list(args)!r}]\ncode = 0\n"
            "try:\n    runpy.run_path('clean.py', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', code)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_unmarked_relabel_takes_every_suggestion_and_keeps_the_rows_without_one(found, noisy, tmp_path):
    reviewed = review(found, tmp_path / "reviewed.csv", lambda r: "")
    out = tmp_path / "labels.csv"
    assert call(clean.main, ["apply", str(reviewed), "--report", str(found), "--out", str(out),
                             "--unmarked", "relabel"]) == 0
    lf = labelfile.read(out)
    given = {p: lf.classes[y] for p, y in lf.items}
    checker = next(p for p, kind in noisy[1].items() if kind == "outlier")
    assert len(given) == 3 * 14 + 5 and checker in given
    assert all(given[r["path"]] == files_cell(r["suggested"]) for r in rows(found) if r["kind"] == "label")


def files_cell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


@pytest.mark.parametrize("args, hint", [
    (["find", "/no/such/job"], "does not exist"),
    (["find", "tests"], "is not a k-fold job"),
    (["fnid", "x"], "invalid choice: 'fnid'"),
    (["find", "tests", "--grdi", "3"], "did you mean --grid?"),
    (["apply", "/no/such.csv", "--out", "x.csv"], "does not exist"),
    (["apply", "README.md"], "the following arguments are required: --out"),
])
def test_a_bad_command_line_is_answered_in_one_line_before_torch_is_imported(args, hint):
    result = run_script(*args)
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_apply_loads_no_torch_and_refuses_to_replace_a_file(found, tmp_path):
    reviewed = review(found, tmp_path / "reviewed.csv", lambda r: "")
    (tmp_path / "taken.csv").write_text("mine")
    result = run_script("apply", str(reviewed), "--report", str(found), "--out", str(tmp_path / "taken.csv"))
    assert result.stdout.split() == ["no", "torch", "2"] and "already exists" in result.stderr
    assert (tmp_path / "taken.csv").read_text() == "mine"


def test_an_unfinished_job_is_answered_with_the_command_that_finishes_it(job, tmp_path):
    copy = tmp_path / "job"
    shutil.copytree(job, copy, ignore=shutil.ignore_patterns("label-issues*"))
    (copy / "fold-3" / "best.pt").unlink()
    result = run_script("find", str(copy))
    assert result.stdout.split() == ["no", "torch", "2"] and "python train.py --resume" in result.stderr


def test_no_function_of_the_cleaning_package_is_longer_than_80_lines():
    long = [f"{p.name}:{n.name}" for p in (ROOT / "imgcls").rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert long == [] and all(len(p.read_text().splitlines()) < 500 for p in (ROOT / "imgcls").rglob("*.py"))


def test_the_cleaning_package_imports_no_entry_script():
    entry = {"train", "eval", "test", "export", "runs", "clean"}
    for p in (ROOT / "imgcls").rglob("*.py"):
        names = {a.name.split(".")[0] for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import)
                 for a in n.names} | {n.module.split(".")[0] for n in ast.walk(ast.parse(p.read_text()))
                                      if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & entry, p
    assert os.path.isfile(ROOT / "requirements-clean.txt")


def hand_report(folder: Path, items: list[tuple[str, list[str]]], issues: list[list[str]], multilabel: bool = False,
                data: str = "/elsewhere/data") -> Path:
    """A report folder as clean.py find writes it, made by hand for apply (no torch): the images exist, the
    record lists them, label_issues.csv holds `issues` (path, given, suggested, score, kind, action, note)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path, _ in items:
        Path(os.fsdecode(path)).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(os.fsencode(path), format="PNG")
    classes = sorted({n for _, names in items for n in names})
    record = {"version": 1, "job": "/elsewhere/job", "data": data, "label_sep": " ", "multilabel": multilabel,
              "classes": classes, "split_column": False, "items": [[p, names, None] for p, names in items]}
    (folder / "label_issues.json").write_text(json.dumps(record))
    with open(folder / "label_issues.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows([["path", "given", "suggested", "score", "kind", "action", "note"], *issues])
    return folder / "label_issues.csv"


def test_unmarked_relabel_keeps_the_labels_of_a_multilabel_outlier(tmp_path):
    a, b = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")
    reviewed = hand_report(tmp_path / "report", [(a, ["cat", "dog"]), (b, ["dog"])],
                           [[a, "cat dog", "", "0.9", "outlier", "", "far"],
                            [b, "dog", "cat dog", "0.8", "label", "", "missing: cat"]], multilabel=True)
    out = tmp_path / "fixed.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(out), "--unmarked", "relabel"]) == 0
    lf = labelfile.read(out)
    assert {p: {lf.classes[c] for c in y} for p, y in lf.items} == {a: {"cat", "dog"}, b: {"cat", "dog"}}


@pytest.mark.parametrize("folder", [" photos", "~"])
def test_the_corrected_file_names_images_train_py_finds_below_a_folder_a_label_file_would_misread(tmp_path, folder):
    a, b = str(tmp_path / folder / "cat" / "a.png"), str(tmp_path / folder / "dog" / "b.png")
    reviewed = hand_report(tmp_path / "report", [(a, ["cat"]), (b, ["dog"])], [[a, "cat", "dog", "0.9", "label",
                                                                                  "relabel", ""]])
    out = tmp_path / "fixed.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(out)]) == 0
    lf = labelfile.read(out)  # a path cell is stripped and ~ expanded, as train.py reads it
    assert {p: lf.classes[y] for p, y in lf.items} == {a: "dog", b: "dog"}


def test_apply_refuses_in_one_line_an_image_name_a_label_file_cannot_hold(tmp_path, capsys):
    bad = os.fsdecode(os.fsencode(str(tmp_path / "img")) + b"/caf\xe9.png")  # Latin-1, not UTF-8
    good = str(tmp_path / "img" / "b.png")
    reviewed = hand_report(tmp_path / "report", [(bad, ["cat"]), (good, ["dog"])],
                           [[good, "dog", "cat", "0.9", "label", "relabel", ""]])
    out = tmp_path / "fixed.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(out)]) == 2  # train.py could not read the file
    err = capsys.readouterr().err
    assert "caf\\xe9.png" in err and "not UTF-8" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_image_whose_name_is_not_utf8_can_be_dropped(tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path / "img")) + b"/caf\xe9.png")
    good, other = str(tmp_path / "img" / "b.png"), str(tmp_path / "img" / "c.png")
    reviewed = hand_report(tmp_path / "report", [(bad, ["cat"]), (good, ["dog"]), (other, ["cat"])],
                           [[bad, "cat", "dog", "0.9", "label", "drop", ""]])
    out = tmp_path / "fixed.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(out)]) == 0
    assert sorted(p for p, _ in labelfile.read(out).items) == [good, other]


def test_the_printed_train_command_works_for_a_file_name_starting_with_a_dash(tmp_path, capsys, monkeypatch):
    a, b = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")
    reviewed = hand_report(tmp_path / "report", [(a, ["cat"]), (b, ["dog"])], [])
    monkeypatch.chdir(tmp_path)
    assert call(clean.main, ["apply", str(reviewed), "--out=-fixed.csv"]) == 0
    command = capsys.readouterr().out.splitlines()[-1].split("train on it: ")[1].split()
    given = train.read_command_line(command[2:])  # as train.py would parse it
    assert Path(given["data"]).resolve() == tmp_path / "-fixed.csv"


def test_a_reviewed_csv_saved_with_semicolons_is_read(tmp_path):
    a, b = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")
    hand_report(tmp_path / "report", [(a, ["cat"]), (b, ["dog"])], [])
    reviewed = tmp_path / "report" / "reviewed.csv"  # as a spreadsheet set to a comma-decimal locale saves it
    reviewed.write_text(f"\ufeffpath;given;suggested;score;kind;action;note\r\n{a};cat;dog;0,91;label;relabel;\r\n",
                        encoding="utf-8")
    out = tmp_path / "fixed.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(out)]) == 0
    lf = labelfile.read(out)
    assert {p: lf.classes[y] for p, y in lf.items} == {a: "dog", b: "dog"}


def test_apply_says_which_files_the_job_did_not_use_and_so_are_not_in_the_corrected_file(tmp_path, capsys):
    from imgcls.cleaning.job import Job
    from imgcls.cleaning.oof import Predictions
    from imgcls.cleaning.output import data_record

    a, b, broken = (str(tmp_path / "data" / c / n) for c, n in (("cat", "a.png"), ("dog", "b.png"), ("dog", "x.png")))
    hand_report(tmp_path / "report", [(a, ["cat"]), (b, ["dog"])], [])
    Path(broken).write_bytes(b"not a picture")
    (tmp_path / "job" / "fold-1").mkdir(parents=True)
    (tmp_path / "job" / "fold-1" / "split.json").write_text(json.dumps(
        {"classes": ["cat", "dog"], "train": [[a, 0]], "val": [[b, 1]], "skipped": [[broken, "not an image"]]}))
    job = Job(tmp_path / "job", {"data": str(tmp_path / "data"), "folds": 1}, [tmp_path / "job" / "fold-1"])
    pred = Predictions([(a, 0), (b, 1)], ["cat", "dog"], False, np.array([1, 1]), np.full((2, 2), 0.5))
    (tmp_path / "report" / "label_issues.json").write_text(json.dumps(data_record(job, pred, " ")))
    reviewed = tmp_path / "report" / "label_issues.csv"
    assert call(clean.main, ["apply", str(reviewed), "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) of the data set the job did not use" in out and "x.png (not an image)" in out
