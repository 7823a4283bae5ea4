"""k-fold cross-validation: K runs on stratified folds, a summary of their spread, resumable as a whole."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import Killed, kill_after_saving, make_folder, train_args

import runs
import train
from imgcls import runs_table


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("cv-data"), per_class=8)


@pytest.fixture(scope="module")
def cv_job(flat, tmp_path_factory) -> Path:
    job = tmp_path_factory.mktemp("cv") / "job"
    assert train.main(train_args(flat, job, "--mode", "scratch", "--folds", "3", "--test-split", "0.25")) == 0
    return job


def run(args: list[str]) -> int:
    """train.py as a command: its exit status."""
    try:
        return train.run(args)
    except SystemExit as e:
        return int(e.code)


def split_of(job: Path, k: int) -> dict:
    return json.loads((job / f"fold-{k}" / "split.json").read_text())


def test_the_folds_validate_on_every_image_once_and_the_test_split_on_none(cv_job):
    vals = [{p for p, _ in split_of(cv_job, k)["val"]} for k in (1, 2, 3)]
    tests = [{p for p, _ in split_of(cv_job, k)["test"]} for k in (1, 2, 3)]
    pool = {p for p, _ in split_of(cv_job, 1)["train"]} | vals[0]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 6 and not tests[0] & pool
    assert not vals[0] & vals[1] and not vals[1] & vals[2] and not vals[0] & vals[2]
    assert vals[0] | vals[1] | vals[2] == pool and len(pool) == 18
    for k in (1, 2, 3):  # stratified: each fold validates on every class
        assert sorted({y for _, y in split_of(cv_job, k)["val"]}) == [0, 1, 2]


def test_the_summary_is_the_mean_and_spread_of_the_folds(cv_job):
    summary = json.loads((cv_job / "cv_summary.json").read_text())
    best = [json.loads((cv_job / f"fold-{k}" / "summary.json").read_text())["best_val_acc"] for k in (1, 2, 3)]
    assert summary["best_val_acc"]["per_fold"] == best
    assert summary["best_val_acc"]["mean"] == pytest.approx(statistics.mean(best))
    assert summary["best_val_acc"]["std"] == pytest.approx(statistics.stdev(best))
    assert set(summary["per_class_acc"]) == {"blue", "green", "red"}


def test_runs_py_shows_the_job_as_one_line_with_its_spread(cv_job, capsys):
    assert runs.main([str(cv_job.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("job") and "3 folds (+-" in lines[1]


def test_runs_py_shows_the_settings_the_jobs_folds_trained_with(cv_job):
    """Not placeholders for what the recipe chose (the job's cv.json holds only what was given)."""
    fold = runs_table.describe(cv_job / "fold-1")
    job = runs_table.describe_cv(cv_job)
    for column in ("data", "model", "mode", "size", "recipe", "optimizer", "lr"):
        assert job[column] == fold[column], column


def test_a_killed_job_resumes_its_unfinished_fold_and_keeps_the_finished_ones(flat, tmp_path, monkeypatch):
    job = tmp_path / "job"
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt" and path.parent.name == "fold-2")
    args = train_args(flat, job, "--mode", "scratch", "--folds", "3", "--epochs", "2", "--save-interval", "0")
    with pytest.raises(Killed):
        train.main(args)
    monkeypatch.undo()
    assert (job / "fold-1" / "summary.json").exists() and not (job / "fold-3").exists()
    first = (job / "fold-1" / "best.pt").stat().st_mtime_ns
    assert train.main(["--resume", str(job)]) == 0
    assert (job / "fold-1" / "best.pt").stat().st_mtime_ns == first  # finished: not trained again
    rows = (job / "fold-2" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    resumed = [json.loads(line) for line in (job / "fold-2" / "resumes.jsonl").read_text().splitlines()]
    assert len(resumed) == 1 and not (job / "fold-3" / "resumes.jsonl").exists()  # resumed; the third started
    assert json.loads((job / "cv_summary.json").read_text())["folds"] == 3


def test_one_fold_resumed_on_its_own_is_refused_so_the_jobs_summary_stays_true(cv_job, tmp_path, capsys):
    summary = (cv_job / "cv_summary.json").read_text()
    (tmp_path / "link").symlink_to(cv_job / "fold-2")
    for given in (cv_job / "fold-2", tmp_path / "link"):
        assert run(["--resume", str(given), "--epochs", "3"]) == 2
        assert f"resume the job: python train.py --resume {cv_job}" in capsys.readouterr().err
    assert (cv_job / "cv_summary.json").read_text() == summary


def test_folds_of_one_are_refused(flat, tmp_path, capsys):
    assert run(train_args(flat, tmp_path / "job", "--folds", "1")) == 2
    assert "--folds must be 2 or more" in capsys.readouterr().err


def test_more_folds_than_images_is_refused_and_small_classes_are_named(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    assert run(train_args(data, tmp_path / "job", "--folds", "10", "--mode", "scratch")) == 2
    assert "--folds 10: only 9 images" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()  # the job that could not start left nothing behind
    assert train.main(train_args(data, tmp_path / "job", "--folds", "4", "--mode", "scratch")) == 0
    assert capsys.readouterr().err.count("fewer images than the 4 folds: blue (3)") == 1  # once, not per fold


def test_a_job_that_fails_to_start_can_simply_be_run_again(flat, tmp_path, capsys):
    assert run(train_args(flat, tmp_path / "job", "--folds", "2", "--model", "resnet1")) == 2
    assert "resnet1" in capsys.readouterr().err and not (tmp_path / "job").exists()


def test_the_settings_that_define_a_job_cannot_change_on_resume(flat, tmp_path, capsys):
    from imgcls.training import crossval

    job = tmp_path / "job"
    crossval.prepare({"data": str(flat), "folds": 2, "out": str(job), "mode": "scratch"})  # as if killed before fold-1
    assert run(["--resume", str(job), "--seed", "7"]) == 2
    assert "cannot change --seed" in capsys.readouterr().err and not (job / "fold-1").exists()


def test_a_fold_that_never_validated_on_a_class_does_not_count_it_as_zero(tmp_path):
    from imgcls.training import crossval

    for k, confusion in enumerate(([[2, 0], [1, 1]], [[3, 0], [0, 0]]), start=1):
        (tmp_path / f"fold-{k}").mkdir()
        (tmp_path / f"fold-{k}" / "summary.json").write_text(json.dumps(
            {"classes": ["a", "b"], "best_val_acc": 75.0 + 25 * (k - 1), "val_confusion": confusion}))
    summary = crossval.summarise(tmp_path, 2)
    assert summary["per_class_acc"]["b"] == {"mean": 50.0, "std": None, "folds": 1}
    assert summary["per_class_acc"]["a"]["mean"] == 100.0


def test_a_resumed_job_is_unfinished_until_every_fold_is_again(cv_job, tmp_path, monkeypatch):
    import shutil

    job = shutil.copytree(cv_job, tmp_path / "job")
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt")
    with pytest.raises(Killed):
        train.main(["--resume", str(job), "--epochs", "2", "--save-interval", "0"])
    assert not (job / "cv_summary.json").exists()  # runs.py must not show the old one as the result


def test_a_damaged_job_settings_file_is_one_line(cv_job, tmp_path, capsys):
    import shutil

    job = shutil.copytree(cv_job, tmp_path / "job")
    (job / "cv.json").write_text("[]")
    assert run(["--resume", str(job)]) == 2
    assert "cv.json cannot be read" in capsys.readouterr().err


def test_folds_with_lr_find_is_refused(flat, tmp_path, capsys):
    assert run(train_args(flat, tmp_path / "job", "--folds", "2", "--lr-find")) == 2
    assert "without --folds" in capsys.readouterr().err


def test_an_interrupted_fold_points_at_the_job_to_resume(flat, tmp_path, monkeypatch, capsys):
    from imgcls.training import fit

    monkeypatch.setattr(fit, "train", lambda given: 130)  # what a fold returns after Ctrl-C
    assert train.main(train_args(flat, tmp_path / "job", "--folds", "2")) == 130
    assert f"python train.py --resume {tmp_path / 'job'}" in capsys.readouterr().err


def test_a_k_fold_job_given_as_a_checkpoint_names_its_fold_folders(cv_job, flat, capsys):
    """eval.py, test.py and export.py take one model; a k-fold job has one per fold."""
    import eval as evaluate
    from imgcls import cli

    with pytest.raises(SystemExit) as stop:
        cli.cli(evaluate.main, [str(flat), "--checkpoint", str(cv_job)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "k-fold job (3 folds)" in err and str(cv_job / "fold-1") in err


@pytest.mark.parametrize("given", ["best.pt", "last.pt", "no cv.json"])
def test_a_k_fold_jobs_model_file_or_a_copy_without_its_settings_names_its_fold_folders(given, cv_job, flat, tmp_path,
                                                                                           capsys):
    import shutil

    import export
    import test as predict
    from imgcls import cli

    job = cv_job
    if given == "no cv.json":  # copied without its settings file, say
        job = tmp_path / "copy"
        for k in (1, 2, 3):
            (job / f"fold-{k}").mkdir(parents=True)
            shutil.copy(cv_job / f"fold-{k}" / "best.pt", job / f"fold-{k}" / "best.pt")
    checkpoint = str(job if given == "no cv.json" else job / given)
    scripts = ((evaluate_main(), [str(flat)]), (predict.main, [str(flat)]), (export.main, ["--format", "onnx"]))
    for entry, args in scripts:
        with pytest.raises(SystemExit) as stop:
            cli.cli(entry, [*args, "--checkpoint", checkpoint])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
        assert str(job / "fold-1") in err and "not a run folder" not in err, err


def test_without_a_checkpoint_the_newest_model_in_runs_is_not_an_older_run_when_the_newest_is_a_k_fold_job(
        cv_job, flat, tmp_path, monkeypatch, capsys):
    import os
    import shutil

    from imgcls import cli

    (tmp_path / "runs" / "older").mkdir(parents=True)
    shutil.copy(cv_job / "fold-1" / "best.pt", tmp_path / "runs" / "older" / "best.pt")
    os.utime(tmp_path / "runs" / "older" / "best.pt", (1, 1))
    (tmp_path / "runs" / "job").symlink_to(cv_job)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.cli(evaluate_main(), [str(flat)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "k-fold job" in err and "fold-1" in err


def evaluate_main():
    import eval as evaluate

    return evaluate.main


def test_runs_py_shows_a_jobs_folds_below_it_and_takes_the_jobs_folder_itself(cv_job, capsys):
    assert runs.main([str(cv_job), "--folds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["job", "job/fold-1", "job/fold-2", "job/fold-3"]
    assert "3 folds (+-" in lines[1]
