"""eval.py and test.py: honest counts, classes matched by name, the same predictions from both."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import call, make_folder

import eval as evaluate
import test as predict
from imgcls.evaluation import evalset


def run_eval(trained_run: Path, data: Path, out: Path) -> dict:
    assert call(evaluate.main, [str(data), "--checkpoint", str(trained_run / "best.pt"), "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_second_evaluation_of_the_same_files_decodes_nothing(trained_run, colours_eval, tmp_path, monkeypatch):
    from imgcls.data import check, images

    decoded = []
    # the check and the loader (thumbnails are drawn apart), patched where they are looked up
    for module, name in ((check, "inspect_file"), (images, "load_image")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: decoded.append(name) or real(*a))
    args = [str(colours_eval), "--checkpoint", str(trained_run / "best.pt"), "--cache-dir", str(tmp_path / "c")]
    assert call(evaluate.main, [*args, "--out", str(tmp_path / "first")]) == 0
    assert decoded == ["inspect_file"] * 18  # the check decodes each image once and fills the cache
    decoded.clear()
    assert call(evaluate.main, [*args, "--out", str(tmp_path / "second")]) == 0
    assert decoded == []
    first, second = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("first", "second"))
    assert first["confusion_matrix"] == second["confusion_matrix"]


def test_eval_without_the_image_cache_writes_no_decoded_images(trained_run, colours_eval, tmp_path):
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run / "best.pt"), "--cache-dir",
                                str(tmp_path / "c"), "--no-image-cache", "--out", str(tmp_path / "ev")]) == 0
    assert not list((tmp_path / "c").glob("images/*.npy"))


def test_confusion_matrix_counts_every_image_once(trained_run, colours_eval, tmp_path):
    m = run_eval(trained_run, colours_eval, tmp_path / "ev")
    cm = torch.tensor(m["confusion_matrix"])
    assert cm.sum() == m["images"] == 18
    assert cm.sum(1).tolist() == [6, 6, 6]
    assert m["accuracy"] == pytest.approx(100 * cm.trace().item() / cm.sum().item())
    assert set(m["per_class"]) == {"blue", "green", "red"}
    for name in ("confusion_matrix.png", "misclassified.csv", "classification_report.txt"):
        assert (tmp_path / "ev" / name).exists()


def test_a_folder_missing_a_class_keeps_the_per_class_numbers_of_the_rest(trained_run, colours_eval, tmp_path, capsys):
    full = run_eval(trained_run, colours_eval, tmp_path / "full")
    part = tmp_path / "part"
    for name in ("green", "red"):  # 'blue' absent: by position, green would be read as blue
        shutil.copytree(colours_eval / name, part / name)
    sub = run_eval(trained_run, part, tmp_path / "sub")
    assert "no images of class(es) blue" in capsys.readouterr().err
    for name in ("green", "red"):
        assert sub["per_class"][name] == full["per_class"][name]
    assert sub["images"] == 12


def test_metrics_json_keeps_its_keys_and_their_order(trained_run, colours_eval, tmp_path):
    """metrics.json is EvalResult.to_json(): users and scripts read it, so its keys stay those it always had."""
    m = run_eval(trained_run, colours_eval, tmp_path / "e")
    assert list(m) == ["accuracy", "images", "classes", "confusion_matrix", "per_class", "most_confused",
                       "top2_accuracy", "temperature", "calibrated", "ece", "reliability", "risk_coverage",
                       "checkpoint", "data", "evaluated", "caveats", "skipped"]
    assert list(m["per_class"]["red"]) == ["accuracy", "precision", "recall", "f1", "support"]
    assert list(m["ece"]) == ["raw", "calibrated"] and list(m["reliability"]) == ["raw", "calibrated"]


def test_folder_classes_are_matched_by_name_not_position():
    assert evalset.match_classes(["red", "blue", "green"], ["blue", "green", "red"]) == [2, 0, 1]


def test_a_class_the_model_does_not_know_is_refused(trained_run, colours_eval, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(colours_eval, data)
    make_folder(data, per_class=2, classes={"purple": (120, 0, 120)})
    assert call(evaluate.main, [str(data), "--checkpoint", str(trained_run / "best.pt")]) == 2
    assert "does not know class(es) purple" in capsys.readouterr().err


def test_test_py_labels_match_what_eval_py_predicted(trained_run, colours_eval, tmp_path):
    run_eval(trained_run, colours_eval, tmp_path / "ev")
    wrong = {r["path"]: r["predicted"] for r in csv.DictReader(open(tmp_path / "ev" / "misclassified.csv"))}
    assert call(predict.main, [str(colours_eval), "--checkpoint", str(trained_run / "best.pt"),
                               "--out", str(tmp_path / "t")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "t" / "predictions.csv")))
    assert len(rows) == 18
    for r in rows:
        true = Path(r["path"]).parent.name
        assert r["label"] == wrong.get(r["path"], true)
    assert (tmp_path / "t" / "predictions.png").exists()


def test_test_py_reports_an_unreadable_file_and_predicts_the_rest(trained_run, colours_eval, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    good = sorted((colours_eval / "red").glob("*.png"))[:2]
    args = [str(bad), *map(str, good), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "t"),
            "--topk", "2"]
    assert call(predict.main, args) == 0
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "t" / "predictions.csv"))}
    assert rows[str(bad)]["status"].startswith("unreadable")
    assert all(rows[str(p)]["status"] == "ok" and rows[str(p)]["label_2"] and rows[str(p)]["probability_2"]
               for p in good)
    assert rows[str(bad)]["label_1"] == rows[str(bad)]["probability_1"] == ""
    assert "unreadable" in capsys.readouterr().out


def test_test_py_expands_glob_patterns(trained_run, colours_eval, tmp_path):
    assert call(predict.main, [str(colours_eval / "*" / "*_00[01].png"), "--checkpoint",
                               str(trained_run / "best.pt"), "--out", str(tmp_path / "t")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "t" / "predictions.csv")))) == 6


def test_eval_names_the_folders_it_ignores_by_name(trained_run, colours_eval, tmp_path, capsys):
    data = tmp_path / "photos"
    shutil.copytree(colours_eval, data)
    (data / "__MACOSX").mkdir()
    shutil.copy(sorted((data / "red").iterdir())[0], data / "__MACOSX" / "x.png")
    run_eval(trained_run, data, tmp_path / "e")
    assert f"ignored folder(s) by name: {data / '__MACOSX'}" in capsys.readouterr().out


def test_a_report_folder_in_the_runs_data_or_beside_a_data_sets_test_folder_is_refused(trained_run, colours,
                                                                                         tmp_path, capsys):
    """Both would be read from then on as a class, or break the train/ val/ test/ layout."""
    root = tmp_path / "photos"
    for part in ("train", "val", "test"):
        make_folder(root / part, per_class=2)
    before = sorted(p.name for p in colours.iterdir())
    assert call(evaluate.main, ["--checkpoint", str(trained_run), "--out", str(colours / "report")]) == 2
    assert call(evaluate.main, [str(root / "test"), "--checkpoint", str(trained_run), "--out",
                                str(root / "report")]) == 2
    assert capsys.readouterr().err.count("is inside the data folder") == 2
    assert sorted(p.name for p in colours.iterdir()) == before and not (root / "report").exists()


def test_a_file_whose_name_looks_like_a_pattern_is_that_file(tmp_path):
    """Browsers and file managers name copies `photo [1].jpg`: the file named, not what a pattern matches."""
    for name in ("img[1].png", "img1.png", "photo [1].png"):
        (tmp_path / name).write_bytes(b"x")
    assert predict.expand([str(tmp_path / "img[1].png")]) == [str(tmp_path / "img[1].png")]
    assert predict.expand([str(tmp_path / "photo [1].png")]) == [str(tmp_path / "photo [1].png")]
    assert predict.expand([str(tmp_path / "img[0-9].png")]) == [str(tmp_path / "img1.png")]  # still a pattern


def test_a_folder_gives_test_py_every_file_that_eval_py_reads(colours_eval, tmp_path):
    """An image without an extension is predicted, and a file that is not an image reported, as eval.py does."""
    folder = tmp_path / "samples"
    shutil.copytree(colours_eval / "red", folder)
    shutil.copy(sorted(folder.iterdir())[0], folder / "IMG_0001")
    (folder / "notes.txt").write_text("not an image")
    assert predict.expand([str(folder)]) == sorted(str(p) for p in folder.iterdir())


def test_test_py_takes_each_file_once_however_it_is_reached(colours_eval, tmp_path):
    """As eval.py reads a folder: a link to an image beside it, or into another class, is the same image;
    and one file given under several spellings is one file."""
    folder = tmp_path / "samples"
    shutil.copytree(colours_eval, folder)
    (folder / "red" / "again.png").symlink_to("red_000.png")
    (folder / "red" / "cross.png").symlink_to("../blue/blue_000.png")
    expected = sorted(str(p) for p in folder.rglob("*.png") if not p.is_symlink())
    assert sorted(predict.expand([str(folder)])) == expected
    one = folder / "red" / "red_000.png"
    two = folder / "blue" / "blue_001.png"
    assert predict.expand([str(one), str(two), str(folder / "red" / "." / "red_000.png"),
                           str(folder / "red" / "again.png")]) == [str(one), str(two)]


@pytest.mark.parametrize("problem", ["missing", "not ours", "empty folder"])
def test_bad_checkpoint_or_folder_is_one_line_and_exit_2(problem, trained_run, colours_eval, tmp_path, capsys):
    ckpt, data = trained_run / "best.pt", colours_eval
    if problem == "missing":
        ckpt = tmp_path / "nope.pt"
    elif problem == "not ours":
        ckpt = tmp_path / "plain.pt"
        torch.save({"weight": torch.zeros(2)}, ckpt)
    else:
        data = tmp_path / "empty"
        data.mkdir()
    assert call(evaluate.main, [str(data), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_run_folder_is_accepted_as_the_checkpoint_and_a_second_report_does_not_replace_the_first(
        trained_run, colours_eval, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for _ in range(2):
        assert evaluate.main([str(colours_eval), "--checkpoint", str(run)]) == 0
    reports = sorted(p.name for p in run.iterdir() if p.name.startswith("eval-"))
    assert reports == [f"eval-{colours_eval.name}-best", f"eval-{colours_eval.name}-best-2"]


def test_an_unknown_model_name_gets_the_closest_names(capsys):
    from imgcls.errors import UsageError
    from imgcls.networks import build

    with pytest.raises(UsageError, match="did you mean resnet18"):
        build.check_name("resnet81")


def test_the_data_folder_is_given_the_same_way_as_in_train_and_export(trained_run, colours_eval, tmp_path):
    from imgcls.errors import UsageError

    ckpt = str(trained_run / "best.pt")
    assert evaluate.main(["--data", str(colours_eval), "--checkpoint", ckpt, "--out", str(tmp_path / "e")]) == 0
    assert predict.main(["--data", str(colours_eval / "red"), "--checkpoint", ckpt, "--out", str(tmp_path / "p")]) == 0
    with pytest.raises(UsageError, match="once"):
        evaluate.main([str(colours_eval), "--data", str(colours_eval), "--checkpoint", ckpt])


FORMULA_NAMES = {"blue": "=HYPERLINK(\"x\")", "green": "a:b;c", "red": "-1"}  # a formula, the old separators, a minus


def renamed_model(trained_run: Path, folder: Path) -> Path:
    """The trained model with classes a spreadsheet would run as formulas or a parser would split."""
    from imgcls import checkpoint

    ckpt = checkpoint.load(trained_run / "best.pt")
    ckpt["classes"] = [FORMULA_NAMES[c] for c in ckpt["classes"]]
    checkpoint.save(ckpt, folder / "renamed.pt")
    return folder / "renamed.pt"


def read_cells(path: Path) -> list[dict[str, str]]:
    """A CSV of ours as a parser reads it: one leading ' taken off a cell that has one (files.csv_cell)."""
    with open(path, newline="") as f:
        return [{k: v[1:] if v.startswith("'") else v for k, v in row.items()} for row in csv.DictReader(f)]


def test_predictions_csv_is_safe_in_a_spreadsheet_and_unambiguous_for_a_parser(trained_run, colours_eval, tmp_path,
                                                                                monkeypatch):
    model = renamed_model(trained_run, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((colours_eval / "red").iterdir()), images / "=1+2.png")
    shutil.copy(next((colours_eval / "green").iterdir()), images / "@x.png")
    monkeypatch.chdir(images)
    assert call(predict.main, ["=1+2.png", "@x.png", "--checkpoint", str(model), "--out", str(tmp_path / "p")]) == 0
    raw = list(csv.reader(open(tmp_path / "p" / "predictions.csv", newline="")))
    assert not any(cell[:1] in ("=", "+", "-", "@") for row in raw for cell in row)  # nothing a spreadsheet runs
    rows = read_cells(tmp_path / "p" / "predictions.csv")
    assert [r["path"] for r in rows] == ["=1+2.png", "@x.png"]
    assert [r["label"] for r in rows] == ["-1", "a:b;c"]
    for r in rows:
        top = [(r[f"label_{k}"], float(r[f"probability_{k}"])) for k in (1, 2, 3)]
        assert {name for name, _ in top} == set(FORMULA_NAMES.values())
        assert top[0] == (r["label"], float(r["probability"]))


def test_misclassified_csv_is_safe_in_a_spreadsheet(trained_run, colours_eval, tmp_path):
    model = renamed_model(trained_run, tmp_path)
    data = tmp_path / "data"
    for name, new in FORMULA_NAMES.items():
        shutil.copytree(colours_eval / name, data / new)
    shutil.copy(next((colours_eval / "red").iterdir()), data / FORMULA_NAMES["blue"] / "actually-red.png")
    assert call(evaluate.main, [str(data), "--checkpoint", str(model), "--out", str(tmp_path / "e")]) == 0
    raw = list(csv.reader(open(tmp_path / "e" / "misclassified.csv", newline="")))
    assert not any(cell[:1] in ("=", "+", "-", "@") for row in raw for cell in row)
    wrong = {Path(r["path"]).name: r for r in read_cells(tmp_path / "e" / "misclassified.csv")}
    assert wrong["actually-red.png"]["true"] == FORMULA_NAMES["blue"]
    assert wrong["actually-red.png"]["predicted"] == FORMULA_NAMES["red"]


def test_the_page_and_the_screen_say_the_images_evaluated_are_the_ones_best_pt_was_chosen_on(trained_run, tmp_path,
                                                                                                capsys):
    val = json.loads((trained_run / "split.json").read_text())["val"]
    data = tmp_path / "val-again"
    for path, _ in val:  # links to the run's own validation images
        (data / Path(path).parent.name).mkdir(parents=True, exist_ok=True)
        (data / Path(path).parent.name / Path(path).name).symlink_to(path)
    m = run_eval(trained_run, data, tmp_path / "ev")
    out = capsys.readouterr().out
    assert f"on the {len(val)} validation images best.pt was chosen on (optimistic)" in out
    assert "test images" not in out
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "best.pt was chosen on" in page and "optimistic" in page and m["caveats"]
    assert "the images in" in page  # what was evaluated, named
