"""Label files (CSV) instead of class folders, and a held-out test split that eval.py evaluates by default."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import call, make_folder, train_args
from conftest import write_labels_csv as write_csv

import eval as evaluate
import train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 colour classes x 12 images, in one folder per class (the CSVs point into it)."""
    return make_folder(tmp_path_factory.mktemp("csv-images"))


def rows_of(images: Path, split: bool = False) -> list[list[str]]:
    """One row per image, its path relative to `images`' parent (where the CSVs are written)."""
    rows = []
    for k, p in enumerate(sorted(images.rglob("*.png"))):
        row = [str(p.relative_to(images.parent)), p.parent.name]
        rows.append([*row, ("train", "train", "val", "test")[k % 4]] if split else row)
    return rows


def read_split(run: Path) -> dict:
    return json.loads((run / "split.json").read_text())


def test_a_label_file_trains_like_a_folder_with_paths_relative_to_the_file(images, tmp_path, monkeypatch):
    labels_csv = write_csv(images.parent / "labels.csv", ["path", "label"], rows_of(images))
    monkeypatch.chdir(tmp_path)  # another working directory: paths are the file's, not the shell's
    assert train.main(train_args(Path("..") / os.path.relpath(labels_csv, tmp_path.parent), tmp_path / "run",
                                 "--mode", "scratch")) == 0
    split = read_split(tmp_path / "run")
    assert split["classes"] == ["blue", "green", "red"] and len(split["train"]) + len(split["val"]) == 36
    assert all(Path(p).is_absolute() and Path(p).parent.name == split["classes"][y] for p, y in split["train"])
    assert split["test"] == []


def test_a_split_column_decides_train_val_and_test(images, tmp_path):
    rows = rows_of(images, split=True)
    labels_csv = write_csv(images.parent / "split.csv", ["path", "label", "split"], rows)
    assert train.main(train_args(labels_csv, tmp_path / "run", "--mode", "scratch")) == 0
    split = read_split(tmp_path / "run")
    for name in ("train", "val", "test"):
        expected = sorted(str(images.parent / p) for p, _, s in rows if s == name)
        assert sorted(p for p, _ in split[name]) == expected


@pytest.mark.parametrize("header, row, message", [
    (["path", "label"], ["blue/missing.png", "blue"], "line 3: .* does not exist"),
    (["path", "label", "colour"], ["x", "blue", "b"], "unknown column.*'colour'"),
    (["path"], ["x"], "no label column"),
    (["path", "label", "split"], ["blue/blue_000.png", "blue", "holdout"], "line 3: split 'holdout' is not one of"),
    (["path", "label"], ["blue/blue_001.png", ""], "line 3 has an empty label"),
    (["path", "label"], ["blue/blue_000.png", "green"], "lines 2 and 3 both list"),
    (["path", "label"], ["blue/blue_001.png", "blue", "extra"], "line 3 has 3 field"),
    (["path", "label", "labels"], ["blue/blue_001.png", "blue", "red"], "both a label and a labels column"),
])
def test_a_bad_label_file_is_one_line_naming_the_row_before_anything_starts(header, row, message, images, tmp_path,
                                                                          capsys):
    first = ["blue/blue_000.png", "blue"] + (["train"] if "split" in header else [])
    labels_csv = write_csv(images / "bad.csv", header, [first[:len(header)] if len(header) < 2 else first, row])
    assert call(train.main, train_args(labels_csv, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_label_file_of_one_class_is_refused(images, tmp_path, capsys):
    labels_csv = write_csv(images / "one.csv", ["path", "label"], [["blue/blue_000.png", "blue"]])
    assert call(train.main, train_args(labels_csv, tmp_path / "run")) == 2
    assert "needs at least two" in capsys.readouterr().err


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory) -> Path:
    data = make_folder(tmp_path_factory.mktemp("flat"), per_class=12)
    run = tmp_path_factory.mktemp("runs") / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--test-split", "0.25")) == 0
    return run


def test_the_test_split_is_a_stratified_share_that_training_and_selection_never_see(held_out_run):
    split = read_split(held_out_run)
    test = {p for p, _ in split["test"]}
    assert len(test) == 9 and [y for _, y in split["test"]].count(0) == 3  # a quarter of each class
    assert not test & {p for p, _ in split["train"] + split["val"]}


def test_eval_without_data_evaluates_the_runs_test_split(held_out_run, tmp_path, capsys):
    assert call(evaluate.main, ["--checkpoint", str(held_out_run), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["images"] == 9 and "held-out test split" in m["evaluated"]
    assert "evaluating 9 images: the run's held-out test split" in capsys.readouterr().out


def test_eval_reads_the_runs_split_and_its_checkpoint_once(held_out_run, tmp_path, monkeypatch):
    """eval.py checks --out against the run's data folder, and evaluates the run's test split, from one reading
    of split.json; and runs the one model it loaded."""
    import torch

    reads = []
    read_text, load = Path.read_text, torch.load
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or read_text(self, *a, **k))
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(Path(str(f)).name) or load(f, *a, **k))
    assert call(evaluate.main, ["--checkpoint", str(held_out_run), "--out", str(tmp_path / "e")]) == 0
    assert reads.count("split.json") == 1 and reads.count("best.pt") == 1, reads


def test_eval_without_data_of_a_run_without_a_test_split_says_what_to_give(trained_run, capsys):
    assert call(evaluate.main, ["--checkpoint", str(trained_run)]) == 2
    assert "has no held-out test split" in capsys.readouterr().err


def test_eval_warns_when_it_evaluates_the_images_best_pt_was_chosen_on(held_out_run, tmp_path, capsys):
    val = read_split(held_out_run)["val"]
    labels_csv = write_csv(tmp_path / "val.csv", ["path", "label"], [[p, ("blue", "green", "red")[y]] for p, y in val])
    assert call(evaluate.main, [str(labels_csv), "--checkpoint", str(held_out_run), "--out", str(tmp_path / "e")]) == 0
    assert f"{len(val)} of the {len(val)} images evaluated are the validation images" in capsys.readouterr().err


def test_a_test_split_is_refused_for_data_with_its_own_split(images, tmp_path, capsys):
    labels_csv = write_csv(images.parent / "own.csv", ["path", "label", "split"], rows_of(images, split=True))
    assert call(train.main, train_args(labels_csv, tmp_path / "run", "--mode", "scratch", "--test-split", "0.2")) == 2
    assert "drop --test-split" in capsys.readouterr().err


def test_eval_of_a_label_file_evaluates_its_test_rows(images, trained_run, tmp_path):
    rows = rows_of(images, split=True)
    labels_csv = write_csv(images.parent / "eval.csv", ["path", "label", "split"], rows)
    assert call(evaluate.main, [str(labels_csv), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["images"] == sum(r[2] == "test" for r in rows) and "the test rows of" in m["evaluated"]


def test_eval_without_data_of_a_label_file_run_without_a_test_split_says_what_to_give(images, tmp_path, capsys):
    labels_csv = write_csv(images.parent / "plain.csv", ["path", "label"], rows_of(images))
    assert train.main(train_args(labels_csv, tmp_path / "run", "--mode", "scratch")) == 0
    assert call(evaluate.main, ["--checkpoint", str(tmp_path / "run")]) == 2
    assert "has no held-out test split" in capsys.readouterr().err


def test_a_class_with_no_training_rows_is_refused(images, tmp_path, capsys):
    rows = [r for r in rows_of(images, split=True) if not (r[1] == "red" and r[2] == "train")]
    labels_csv = write_csv(images.parent / "notrain.csv", ["path", "label", "split"], rows)
    assert call(train.main, train_args(labels_csv, tmp_path / "run", "--mode", "scratch")) == 2
    err = capsys.readouterr().err
    assert "red" in err and "no readable training images" in err


def test_eval_warns_about_seen_images_however_the_folder_is_named(held_out_run, tmp_path, monkeypatch, capsys):
    data = Path(read_split(held_out_run)["root"])
    monkeypatch.chdir(data.parent)
    assert call(evaluate.main, [data.name, "--checkpoint", str(held_out_run), "--out", str(tmp_path / "e")]) == 0
    assert "are the training images it learned from" in capsys.readouterr().err


def test_line_numbers_are_the_editors_after_a_quoted_field_that_spans_lines(images, tmp_path, capsys):
    text = 'path,label\nblue/blue_000.png,blue\nblue/blue_001.png,"blue\n"\nblue/missing.png,blue\n'
    (images / "multiline.csv").write_text(text)
    assert call(train.main, train_args(images / "multiline.csv", tmp_path / "run")) == 2
    assert "line 5" in capsys.readouterr().err  # the missing file's line, as an editor numbers it


def test_an_unclosed_quote_is_named_as_such(images, tmp_path, capsys):
    (images / "quote.csv").write_text('path,label\n"blue/blue_000.png,blue\nblue/blue_001.png,blue\n')
    assert call(train.main, train_args(images / "quote.csv", tmp_path / "run")) == 2
    assert "line 2 opens a quote" in capsys.readouterr().err


def test_a_quoted_label_with_a_line_break_inside_is_not_called_an_unclosed_quote(images, tmp_path, capsys):
    (images / "broken.csv").write_text('path,label\nblue/blue_000.png,"bl\nue"\nblue/blue_001.png,blue\n')
    assert call(train.main, train_args(images / "broken.csv", tmp_path / "run")) == 2
    assert "line 2 holds a path or label over several lines (a line break inside quotes" in capsys.readouterr().err


def test_labels_that_differ_only_by_case_are_warned_about(images, tmp_path, capsys):
    rows = rows_of(images)
    rows[0][1] = "Blue"
    labels_csv = write_csv(images.parent / "case.csv", ["path", "label"], rows)
    from imgcls.data import labelfile

    assert labelfile.read(labels_csv).classes == ["Blue", "blue", "green", "red"]
    err = capsys.readouterr().err
    assert "differ only by case" in err and "Blue and blue" in err
