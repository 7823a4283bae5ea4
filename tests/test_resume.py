"""Resume semantics and kills at any moment: a resumed run is the unbroken run, with new settings applied.

Fault injection: interrupts at random moments (a signal sent from inside the data pipeline, so it lands
in training or in validation), each followed by --resume, compared with an unbroken run to the last
digit; and SIGKILL/SIGTERM/SIGINT at random times against a real process with DataLoader workers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Killed, kill_after_saving, make_folder, train_args

import train
from imgcls import checkpoint, runfolder, settings
from imgcls.data import datasets, split
from imgcls.errors import UsageError
from imgcls.training import fit, optim, resume

RANDOM = random.Random(int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000)))


def metrics(run: Path) -> list[list[str]]:
    """epoch, train loss, train acc, val loss, val acc of every epoch, as written."""
    return [r.split(",")[:5] for r in (run / "metrics.csv").read_text().strip().splitlines()[1:]]


def column(run: Path, name: str) -> list[float]:
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    i = rows[0].split(",").index(name)
    return [float(r.split(",")[i]) for r in rows[1:]]


def last(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """20 images a class: 48 train / 12 val, a few batches of 8 per epoch."""
    return make_folder(tmp_path_factory.mktemp("resume-data"), per_class=20)


# ----------------------------------------------------------------------------- settings on resume

@pytest.mark.parametrize("scheduler", ["step", "cosine", "onecycle", "plateau", "none"])
def test_train_longer_trains_the_added_epochs_for_every_scheduler(scheduler, data, tmp_path):
    run = tmp_path / "run"
    args = ("--mode", "scratch", "--epochs", "2", "--scheduler", scheduler, "--optimizer", "sgd", "--lr", "0.05")
    assert train.main(train_args(data, run, *args)) == 0
    before = last(run)["model"]
    assert train.main(["--resume", str(run), "--epochs", "4", "--no-summary"]) == 0
    lrs = column(run, "lr")
    assert len(lrs) == 4 and all(lr > 1e-4 for lr in lrs[2:]), lrs
    after = last(run)["model"]
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_a_longer_cosine_run_continues_the_curve_to_the_new_end_without_a_new_warm_up():
    short = optim.Schedule(settings.TrainConfig(scheduler="cosine", epochs=4, warmup_epochs=1))
    longer = optim.Schedule(settings.TrainConfig(scheduler="cosine", epochs=8, warmup_epochs=1))
    assert short(3.9, 4.0) < 0.05  # the short run ended near zero
    assert longer(4.0, 4.1) == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 3 / 7)))
    assert longer(7.9, 8.0) < 0.01 and longer(1.0, 1.1) == pytest.approx(1.0, rel=0.01)  # no warm-up after it


def test_optimizer_settings_given_on_resume_take_effect_and_are_recorded(data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--recipe", "seed", "--scheduler", "none",
                                 "--lr", "0.01")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--lr", "0.1", "--weight-decay", "0.001",
                       "--momentum", "0.5", "--batch-size", "4", "--no-summary"]) == 0
    groups = last(run)["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(0.1) and g["weight_decay"] == 0.001 and g["momentum"] == 0.5 for g in groups)
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["batch_size"]) == (0.1, 4)
    assert column(run, "lr") == pytest.approx([0.01, 0.1])
    changes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert changes[-1]["epoch"] == 1 and changes[-1]["changed"]["lr"] == [0.01, 0.1]
    assert changes[-1]["changed"]["batch_size"] == [8, 4]


def test_another_optimizer_on_resume_starts_its_state_afresh(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--optimizer", "sgd")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--optimizer", "adamw", "--no-summary"]) == 0
    assert "optimizer changed from sgd to adamw" in capsys.readouterr().out
    assert "exp_avg" in next(iter(last(run)["optimizer"]["state"].values()))


def test_resuming_a_finished_run_without_new_epochs_says_so_and_changes_nothing(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train.main(["--resume", str(run)]) == 0
    assert train.main(["--resume", str(run), "--epochs", "1", "--lr", "0.5"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_training_time_adds_up_across_resumes(data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    first = last(run)["train_time_s"]
    assert first > 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--no-summary"]) == 0
    total = json.loads((run / "summary.json").read_text())["train_time_s"]
    assert total >= first + column(run, "time_s")[1]


def test_fewer_epochs_than_already_trained_are_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--epochs", "2")) == 0
    assert run_cli(["--resume", str(run), "--epochs", "1"]) == 2
    assert "fewer than the 2 epochs" in capsys.readouterr().err


def run_cli(argv: list[str]) -> int:
    try:
        return train.run(argv)
    except SystemExit as e:
        return e.code


# ----------------------------------------------------------------------------- portable runs

def test_a_run_resumes_from_another_working_directory(data, tmp_path, monkeypatch):
    shutil.copytree(data, tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    assert train.main(train_args(Path("photos"), Path("run"), "--mode", "scratch")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--no-summary"]) == 0
    assert (tmp_path / "run" / "skipped.txt").read_text() == ""
    assert last(tmp_path / "run")["epoch"] == 2


def test_resume_needs_no_weights_file_that_only_the_start_needed(data, tmp_path, with_weights):
    from imgcls.networks import build

    weights = tmp_path / "weights.pt"
    torch.save(build.build_model("resnet18", 1000).state_dict(), weights)
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "transfer", "--weights", str(weights))) == 0
    weights.rename(tmp_path / "moved.pt")
    assert train.main(["--resume", str(run), "--epochs", "2", "--no-summary"]) == 0


def test_resume_from_best_pt_is_answered_in_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    assert run_cli(["--resume", str(run / "best.pt"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--resume {run}" in err


def test_a_folder_stopped_before_its_first_checkpoint_is_resumable(data, tmp_path, monkeypatch):
    args = ("--mode", "scratch", "--epochs", "2", "--optimizer", "adam")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    real = fit.fit

    def killed_before_the_first_checkpoint(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "fit", killed_before_the_first_checkpoint)
    run = tmp_path / "run"
    assert train.main(train_args(data, run, *args)) == 130
    assert (run / "config.json").exists() and not (run / "last.pt").exists()
    monkeypatch.setattr(fit, "fit", real)
    assert run_cli(train_args(data, run, *args)) == 2  # a fresh start does not take another run's folder
    assert train.main(["--resume", str(run)]) == 0
    assert metrics(run) == metrics(tmp_path / "whole")


def test_a_folder_left_by_a_kill_during_its_first_write_is_no_run(tmp_path):
    """Only the lock and a temp file: the same command can start the run there again."""
    from imgcls import files

    run = tmp_path / "run"
    run.mkdir()
    (run / files.FolderLock.NAME).touch()
    (run / f".config.json.x1y2{files.TEMP_SUFFIX}").write_text("{")
    files.check_run_dir(run, in_place=False, overwrite=False)
    (run / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        files.check_run_dir(run, in_place=False, overwrite=False)


def test_lr_find_under_torchrun_is_refused_on_every_rank(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *train_args(data, tmp_path / "run", "--lr-find")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count("--lr-find runs in one process") == 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- kill anywhere

def interrupt_at(call: int, sig: int, monkeypatch) -> None:
    """Send `sig` to this process from inside the `call`-th batch collation (training or validation)."""
    real, calls = datasets.collate, [0]

    def collate(batch):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return real(batch)

    monkeypatch.setattr(datasets, "collate", collate)


def test_an_interrupt_during_validation_resumes_to_the_unbroken_run(data, tmp_path, monkeypatch, capsys):
    args = ("--mode", "scratch", "--epochs", "2", "--save-interval", "0", "--scheduler", "cosine")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    run = tmp_path / "run"
    interrupt_at(6 + 1, signal.SIGINT, monkeypatch)  # 6 training batches, then the first validation batch
    assert train.main(train_args(data, run, *args)) == 130
    assert "trained and not yet validated" in capsys.readouterr().err
    monkeypatch.undo()
    assert train.main(["--resume", str(run), "--no-summary"]) == 0
    assert metrics(run) == metrics(tmp_path / "whole")
    assert column(run, "lr") == column(tmp_path / "whole", "lr")


def test_interrupts_at_random_moments_each_resumed_give_the_unbroken_run(data, tmp_path, monkeypatch, capsys):
    # without precise BN: its pass before each validation (interrupted and resumed in the test above) would take
    # most of the random points, and a run interrupted there again and again never gets on
    args = ("--mode", "scratch", "--epochs", "3", "--save-interval", "0", "--hflip", "0.5", "--mixup", "0.2",
            "--no-precise-bn")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    run, argv, points = tmp_path / "run", train_args(data, tmp_path / "run", *args), []
    for _ in range(12):
        interrupt_at(RANDOM.randint(1, 8), RANDOM.choice([signal.SIGINT, signal.SIGTERM]), monkeypatch)
        status = train.main(argv)
        monkeypatch.undo()
        out = capsys.readouterr()
        if points:  # a resume names the point the interrupt before it named, in the same words
            assert f"resuming {run} at {points[-1]}" in out.out
        if status == 0:
            break
        assert status == 130, out.err
        points.append(out.err.split("interrupted at ")[1].split(": saved")[0])
        argv = ["--resume", str(run), "--no-summary"]
    assert len(points) >= 2, points
    assert metrics(run) == metrics(tmp_path / "whole"), f"interrupted at: {points}"


def start(args: list[str], cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def test_kills_at_random_times_with_workers_each_resumed_give_the_unbroken_run(data, tmp_path):
    """SIGKILL, SIGTERM or SIGINT at a random time: during start-up, the file check, training,
    validation or a checkpoint write; then the run is started again (no folder yet) or resumed."""
    args = ("--mode", "scratch", "--epochs", "6", "--save-interval", "0", "--batch-size", "2")
    assert train.main(train_args(data, tmp_path / "whole", *args, "--workers", "0")) == 0
    run, kills = tmp_path / "run", []
    fresh = train_args(data, run, *args, "--workers", "2")
    for _ in range(4):
        argv = ["--resume", str(run), "--no-summary"] if (run / "config.json").exists() else fresh
        proc = start(argv)
        time.sleep(RANDOM.uniform(2.5, 9.0))
        if proc.poll() is not None:
            break
        sig = RANDOM.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 130, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT), err[-2000:]
        kills.append(sig.name)
    argv = ["--resume", str(run), "--no-summary"] if (run / "config.json").exists() else fresh
    proc = start(argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert metrics(run) == metrics(tmp_path / "whole"), f"killed with {kills}"
    assert not list(run.glob(".*.tmp"))


def test_workers_and_augmentation_give_the_same_run_as_no_workers(data, tmp_path):
    args = ("--mode", "scratch", "--epochs", "2", "--hflip", "0.5", "--augment", "trivialaugment")
    assert train.main(train_args(data, tmp_path / "w0", *args, "--workers", "0")) == 0
    assert train.main(train_args(data, tmp_path / "w2", *args, "--workers", "2")) == 0
    assert metrics(tmp_path / "w0") == metrics(tmp_path / "w2")


def test_a_kill_right_after_the_last_checkpoint_leaves_every_file_of_the_finished_run(data, tmp_path, monkeypatch):
    args = ("--mode", "scratch", "--epochs", "2", "--save-interval", "0")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt" and state.get("finished"))
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train.main(train_args(data, run, *args))
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0  # nothing to do: and nothing missing
    assert metrics(run) == metrics(tmp_path / "whole")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_consistent_checkpoint(data, tmp_path, monkeypatch, capsys):
    from imgcls.training import step

    args = ("--mode", "scratch", "--epochs", "2", "--save-interval", "0")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    real, calls = step.train_step, [0]

    def twice_after_a_step(*a, **k):
        out = real(*a, **k)  # the weights have moved; the step is not yet counted
        calls[0] += 1
        if calls[0] == 8:  # the second step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(step, "train_step", twice_after_a_step)
    run = tmp_path / "run"
    assert train.main(train_args(data, run, *args)) == 130
    assert "stopped at once" in capsys.readouterr().err
    monkeypatch.undo()
    assert last(run)["epoch"] == 1  # the checkpoint of epoch 1, not a half-counted step
    assert train.main(["--resume", str(run), "--no-summary"]) == 0
    assert metrics(run) == metrics(tmp_path / "whole")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Killed])
def test_a_run_stopped_while_checking_its_files_is_resumable_by_its_folder(stop, data, tmp_path, monkeypatch):
    args = ("--mode", "scratch", "--epochs", "2")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0

    def stopped(*a, **k):
        raise stop

    monkeypatch.setattr(split, "prepare_data", stopped)
    run = tmp_path / "run"
    try:
        status = train.main(train_args(data, run, *args))
    except Killed:
        status = 137
    except KeyboardInterrupt:  # must not escape: main() says how to go on and returns 130
        status = None
    assert status == (130 if stop is KeyboardInterrupt else 137)
    monkeypatch.undo()
    assert train.main(["--resume", str(run), "--no-summary"]) == 0
    assert metrics(run) == metrics(tmp_path / "whole")


def test_a_resume_asking_to_end_inside_an_unfinished_epoch_is_refused(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupt_at(8 + 6 + 1, signal.SIGINT, monkeypatch)  # epoch 2, its first validation batch
    assert train.main(train_args(data, run, "--mode", "scratch", "--epochs", "3", "--save-interval", "0")) == 130
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert run_cli(["--resume", str(run), "--epochs", "1"]) == 2
    assert "--epochs 2 or more" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_resume_with_a_missing_split_is_one_line_and_exit_2(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    (run / "split.json").unlink()
    assert run_cli(["--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "split.json" in err and len(err.splitlines()) == 1


def test_a_kill_between_the_first_best_pt_and_last_pt_is_started_again(data, tmp_path, monkeypatch):
    """A short run saves once, at its end: summary.json and best.pt, then last.pt. Killed in between, it
    had no checkpoint yet, however finished it looks."""
    args = ("--mode", "scratch", "--epochs", "2")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    kill_after_saving(monkeypatch, lambda state, path: path.name == "best.pt")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train.main(train_args(data, run, *args))
    monkeypatch.undo()
    assert (run / "summary.json").exists() and (run / "best.pt").exists() and not (run / "last.pt").exists()
    assert train.main(["--resume", str(run)]) == 0
    assert metrics(run) == metrics(tmp_path / "whole")


@pytest.mark.parametrize("given", ["last.pt.bak", "best.pt.old", "deleted last.pt", "copied without its dot-files",
                                   "unfinished, copied without its dot-files"])
def test_a_resume_without_the_runs_training_state_is_refused_and_the_run_kept(given, data, tmp_path, capsys):
    """A mistyped checkpoint name, or a last.pt deleted to save space, is not a run stopped before its
    first checkpoint: starting it again there would delete its model and history."""
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--save-interval", "0")) == 0
    gone = given not in ("last.pt.bak", "best.pt.old")
    if gone:
        (run / "last.pt").unlink()
    if "dot-files" in given:  # or made before the marker was: `cp -r run/* copy/`
        (run / runfolder.CHECKPOINTED).unlink()
    if given.startswith("unfinished"):
        (run / "summary.json").unlink()
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "last.pt"}
    assert run_cli(["--resume", str(run if gone else run / given), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert ("is gone" if gone else "does not exist") in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "last.pt"} == kept


def test_a_resume_says_how_many_of_its_images_are_gone_and_refuses_when_all_are(data, tmp_path, capsys):
    """Validation on fewer images is said (its accuracy is not comparable); data moved away is one line, and
    the finished run's files stay as they were."""
    photos = tmp_path / "photos"
    shutil.copytree(data, photos)
    run = tmp_path / "run"
    assert train.main(train_args(photos, run, "--mode", "scratch")) == 0
    val = [p for p, _ in json.loads((run / "split.json").read_text())["val"]]
    for path in val[:2]:
        os.remove(path)
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    out, err = capsys.readouterr()
    assert f"2 of the run's {len(val)} validation images" in err and "(unreadable: 2 val)" in out
    photos.rename(tmp_path / "moved")
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert run_cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert "none of the run's training images are where it found them" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


@pytest.mark.parametrize("part", ["val", "train"])
def test_a_resume_with_all_its_validation_or_training_images_gone_is_refused(part, data, tmp_path, capsys):
    """Validation on no image would be recorded as 0%, training on none stops in its first batch."""
    photos = tmp_path / "photos"
    shutil.copytree(data, photos)
    run = tmp_path / "run"
    assert train.main(train_args(photos, run, "--mode", "scratch")) == 0
    for path, _ in json.loads((run / "split.json").read_text())[part]:
        os.remove(path)
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_cli(["--resume", str(run), "--epochs", "2"]) == 2
    assert f"none of the run's {'validation' if part == 'val' else 'training'} images" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


def test_validation_that_could_read_no_image_stops_the_run_instead_of_recording_0(data, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(data, photos)
    run = tmp_path / "run"
    assert train.main(train_args(photos, run, "--mode", "scratch")) == 0
    for path, _ in json.loads((run / "split.json").read_text())["val"]:
        Path(path).write_bytes(b"")  # there, and unreadable
    assert run_cli(["--resume", str(run), "--epochs", "2"]) == 1
    assert "no validation image could be read" in capsys.readouterr().err
    assert len(metrics(run)) == 1


def test_a_cache_folder_inside_the_data_is_refused_on_resume_too(data, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(data, photos)
    run = tmp_path / "run"
    assert train.main(train_args(photos, run, "--mode", "scratch")) == 0
    assert run_cli(["--resume", str(run), "--epochs", "2", "--cache-dir", str(photos / "cache")]) == 2
    monkeypatch.setenv("IMGCLS_CACHE", str(photos / "env-cache"))
    assert run_cli(["--resume", str(run), "--epochs", "2"]) == 2
    assert capsys.readouterr().err.count("is inside the data folder") == 2
    assert sorted(p.name for p in photos.iterdir()) == sorted(p.name for p in data.iterdir())


def test_the_size_a_run_was_trained_at_given_again_on_resume_is_no_change(data, tmp_path):
    """A run at the weights' own size (224 for resnet18, saved as no --img-size) resumed by a script that
    always passes its settings."""
    run = tmp_path / "run"
    run.mkdir()
    runfolder.write_config(run, settings.TrainConfig(data=str(data), model="resnet18", mode="scratch"))
    cfg, _ = resume.resolve_config({"resume": str(run), "img_size": 224})  # (stopped before its first checkpoint)
    assert cfg.img_size is None
    with pytest.raises(UsageError, match="cannot change --img-size"):
        resume.resolve_config({"resume": str(run), "img_size": 160})


def test_another_out_on_resume_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    assert run_cli(["--resume", str(run), "--epochs", "2", "--out", str(tmp_path / "other")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_the_same_data_folder_spelt_another_way_is_not_a_change(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    assert train.main(train_args(Path(f"../{data.parent.name}/{data.name}"), run, "--mode", "scratch")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--data", str(data), "--no-summary"]) == 0


def test_run_files_are_readable_by_others_as_the_umask_allows(data, tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "split.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_a_resume_keeps_the_preprocessing_the_run_was_trained_with(colours, tmp_path):
    """A newer torchvision or timm may describe the weights' preprocessing otherwise: the run goes on
    with what its checkpoint says."""
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--mode", "scratch", "--epochs", "1")) == 0
    ckpt = checkpoint.load_for_resume(out / "last.pt")
    ckpt["preprocess"]["interpolation"] = "nearest"
    torch.save(ckpt, out / "last.pt")
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0
    assert checkpoint.load(out / "last.pt")["preprocess"]["interpolation"] == "nearest"


def test_a_run_saved_without_a_grad_scaler_resumes_where_fp16_needs_one(colours, tmp_path, monkeypatch):
    """A run trained on a CPU or a bf16 GPU (no scaler: its state is empty) resumed on a GPU whose mixed
    precision is fp16 (T4, V100): the scaler starts afresh instead of refusing the empty state."""
    from imgcls import machine

    run = tmp_path / "run"
    assert train.main(train_args(colours, run, "--mode", "scratch", "--no-amp")) == 0
    assert torch.load(run / "last.pt", weights_only=True)["scaler"] == {}
    monkeypatch.setattr(machine, "autocast_dtype", lambda device, amp: torch.float16 if amp else None)
    assert train.main(["--resume", str(run), "--epochs", "2", "--amp"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["scaler"]["scale"] > 0
