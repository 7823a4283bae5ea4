"""Real-world folders and failures: hostile files, kills, interrupted writes, malicious checkpoints."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_folder, make_image, train_args
from PIL import Image

import eval as evaluate
import train
from imgcls import checkpoint, errors
from imgcls.cli import cli
from imgcls.data import check, datasets, report
from imgcls.data import images as data_images
from imgcls.data import split as data_split
from imgcls.evaluation import inference
from imgcls.networks import build, heads
from imgcls.settings import TrainConfig
from imgcls.training import loop, optim, step

HOSTILE_SKIPS = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "notes.png": "not an image",
                 "bomb.png": "decompression bomb", "lab.tif": "unsupported mode LAB"}


def write_hostile(folder: Path) -> None:
    """Every kind of file a real photo folder holds, in class 'red' (which also has good images)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    make_image((200, 0, 0), 1, 64).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("this is text, not a picture")
    Image.new("1", (10000, 9000)).save(folder / "bomb.png")  # 90 Mpx: over Pillow's safety limit
    Image.new("LAB", (32, 32)).save(folder / "lab.tif")
    make_image((200, 0, 0), 2).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 50000, np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(np.full((32, 32), 0.8, np.float32)).save(folder / "float.tif")
    Image.fromarray(np.full((32, 32), 40000, np.int32)).save(folder / "int32.tif")
    make_image((200, 0, 0), 3).convert("LA").save(folder / "la.png")
    make_image((200, 0, 0), 4).convert("RGBA").save(folder / "rgba.png")
    palette = make_image((200, 0, 0), 5).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.gif", transparency=0)
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / ".ipynb_checkpoints").mkdir(exist_ok=True)
    make_image((0, 0, 0), 6).save(folder / ".ipynb_checkpoints" / "hidden.png")


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("hostile"), per_class=8)
    write_hostile(root / "red")
    (root / ".ipynb_checkpoints").mkdir()
    make_image((0, 0, 0), 7).save(root / ".ipynb_checkpoints" / "x.png")
    return root


def test_every_accepted_mode_becomes_rgb_and_16_bit_is_scaled_not_clipped(hostile):
    for name in ("cmyk.jpg", "sixteen.png", "float.tif", "int32.tif", "la.png", "rgba.png", "palette.gif"):
        arr = data_images.load_image(hostile / "red" / name, 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, name
    assert data_images.load_image(hostile / "red" / "sixteen.png", 8)[0, 0, 0] == round(50000 / 257)  # not 255
    assert data_images.load_image(hostile / "red" / "int32.tif", 8)[0, 0, 0] == round(40000 / 257)
    assert data_images.load_image(hostile / "red" / "float.tif", 8)[0, 0, 0] == round(0.8 * 255)


def test_a_16_bit_image_is_scaled_by_its_depth_not_by_its_brightest_pixel(tmp_path):
    """A dark 16-bit exposure (every value below 256) is dark, not read as 8-bit and 257 times brighter,
    and one pixel more does not turn the picture black."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint16)
    loaded = []
    for brightest in (255, 256):
        pixels[0, 0] = brightest
        path = tmp_path / f"dark-{brightest}.pgm"  # 16-bit PGM: Pillow's mode I
        path.write_bytes(b"P5\n16 16\n65535\n" + pixels.astype(">u2").tobytes())
        assert Image.open(path).mode == "I"
        loaded.append(data_images.load_image(path, 16).astype(float))
    assert loaded[0].max() <= 1 and abs(loaded[0].mean() - loaded[1].mean()) < 0.1


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert tuple(data_images.to_rgb(img).getpixel((0, 0))) == (255, 255, 255)


def test_training_on_a_hostile_folder_skips_exactly_the_bad_files_and_ignores_hidden_ones(hostile, tmp_path, capsys):
    out = tmp_path / "run"
    check.check_files(check.list_files(hostile))  # checks remembered, images not yet cached
    assert train.main(train_args(hostile, out, "--mode", "scratch")) == 0
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    reasons = {Path(p).name: reason for p, reason in skipped.items()}
    assert reasons.keys() == HOSTILE_SKIPS.keys()
    assert all(reasons[name].startswith(why) for name, why in HOSTILE_SKIPS.items())
    assert checkpoint.load(out / "best.pt")["classes"] == ["blue", "green", "red"]
    captured = capsys.readouterr()
    assert "skipped 5 unreadable file(s)" in captured.out
    assert "warning: skipped" not in captured.err  # each bad file is reported once, in skipped.txt
    split = data_split.DataSplit.load(out / "split.json")
    used = {Path(p).name for p, _ in split.train + split.val}
    assert {"cmyk.jpg", "sixteen.png", "palette.gif", "la.png"} <= used and "hidden.png" not in used


def test_check_command_reports_counts_skips_and_imbalance(hostile):
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "check", str(hostile)],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert "3 classes" in result.stdout and "imbalance" in result.stdout
    for name, reason in HOSTILE_SKIPS.items():
        assert f"{name}: {reason}" in result.stdout


def test_check_command_shows_the_test_set_train_would_hold_out(colours):
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "check", str(colours), "--test-split", "0.25"],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    split = data_split.prepare_data(str(colours), test_split=0.25, progress=False)  # what train.py gets
    assert f"{len(split.train)} train + {len(split.val)} val + {len(split.test)} test (held out)" in result.stdout
    counts = split.counts(split.test)
    assert counts[0] > 0 and f"test {counts[0]:6d}" in result.stdout


def test_check_command_shows_what_each_fold_validates_on_and_the_look_alikes_across_folds(colours, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(colours, data)
    for name in ("red", "green"):  # a copy of an image beside it: a leak when the two fall in two folds
        first = sorted((data / name).iterdir())[0]
        shutil.copy(first, data / name / f"copy-{first.name}")
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "check", str(data), "--folds", "3",
                             "--test-split", "0.2"], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    folds = [data_split.prepare_data(str(data), test_split=0.2, folds=3, fold=f, progress=False) for f in (1, 2, 3)]
    pool = len(folds[0].train) + len(folds[0].val)  # what each fold's run gets
    assert f"{pool} images in 3 folds + {len(folds[0].test)} test (held out)" in result.stdout
    for c, name in enumerate(folds[0].classes):
        row = [split.counts(split.val)[c] for split in folds] + [folds[0].counts(folds[0].test)[c]]
        assert re.search(rf"{name} +" + " +".join(map(str, row)) + r"\n", result.stdout), (name, row)
    leaks = {frozenset(leak[:2]) for split in folds for leak in split.leaks}
    images = {p for pair in leaks for p in pair}
    assert leaks and f"warning: {len(images)} image(s) look like an image of another fold" in result.stdout


def test_the_leakage_warning_counts_images_not_pairs(colours, tmp_path, capsys):
    """Copies of one picture: each validation copy looks like three training copies, and is one image."""
    data = tmp_path / "photos"
    shutil.copytree(colours, data / "train")
    make_folder(data / "val", per_class=2, offset=500)
    first = sorted((data / "train" / "red").iterdir())[0]
    for i in range(2):
        shutil.copy(first, data / "train" / "red" / f"copy-{i}.png")
        shutil.copy(first, data / "val" / "red" / f"copy-{i}.png")
    split = data_split.prepare_data(str(data), progress=False)
    held = {b for _, b, _ in split.leaks}
    assert len(split.leaks) > len(held)  # pairs
    lines: list[str] = []
    report.report(split, lines.append)
    assert f"warning: {len(held)} image(s) in val/test look like train images" in "\n".join(lines)
    assert train.main(train_args(data, tmp_path / "run", "--mode", "scratch")) == 0
    assert f"{len(held)} val/test image(s) look like train images" in capsys.readouterr().err


def test_a_second_check_reads_the_cache_instead_of_the_files(hostile, monkeypatch):
    paths = check.list_files(hostile / "red")
    first = check.check_files(paths)

    def boom(*args):
        raise AssertionError("re-inspected a file that had not changed")

    monkeypatch.setattr(check, "inspect_file", boom)
    assert check.check_files(paths) == first


def test_a_check_interrupted_while_filling_the_image_cache_leaves_no_partial_cache(colours, tmp_path, monkeypatch):
    real, seen = check.inspect_file, []

    def interrupted(*args):
        seen.append(1)
        if len(seen) == 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(check, "inspect_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_split.prepare_data(str(colours), cache_dir=str(tmp_path), cache_size=32)
    assert list((tmp_path / "images").iterdir()) == []


def test_exact_copies_across_train_and_val_are_flagged_as_leakage(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=2, offset=50)
    leaked = tmp_path / "val" / "red" / "copy.png"
    leaked.write_bytes((tmp_path / "train" / "red" / "red_000.png").read_bytes())
    split = data_split.prepare_data(str(tmp_path))
    assert split.leaks == [(str(tmp_path / "train" / "red" / "red_000.png"), str(leaked), 0)]


def tiny_loader(paths: list[Path]) -> torch.utils.data.DataLoader:
    ds = datasets.ImageDataset([(str(p), 0) for p in paths], 32, datasets.eval_transform(32))
    return torch.utils.data.DataLoader(ds, batch_size=len(paths), collate_fn=datasets.collate)


def one_epoch(loader) -> dict:
    model = build.build_model("mobilenet_v2", 3)
    opt = optim.make_optimizer(TrainConfig(lr=0.01), model)
    learner = step.Learner(model, opt, torch.amp.GradScaler("cuda", enabled=False), torch.nn.CrossEntropyLoss(),
                             lambda x: x.float() / 255, contextlib.nullcontext, torch.device("cpu"),
                             lambda start, end: 1.0)
    return step.train_one_epoch(learner, loader, step.Progress(), len(loader.dataset), seed=0, show=False)


def test_a_file_deleted_during_training_is_skipped_with_a_warning(colours, tmp_path, capsys):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        make_image((9, 9, 9), i).save(paths[-1])
    paths[0].unlink()
    stats = one_epoch(tiny_loader(paths))
    assert stats["bad"] == 1 and stats["images"] == 3
    assert f"skipped {paths[0]}" in capsys.readouterr().err


def test_too_many_unreadable_files_in_a_batch_stop_training_clearly(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    make_image((9, 9, 9), 0).save(paths[0])
    with pytest.raises(errors.TrainingError, match="3 of 4 images in a batch could not be read"):
        one_epoch(tiny_loader(paths))


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)

    class FailsHalfway:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.save({"epoch": 2, "big": torch.zeros(10000), "bad": FailsHalfway()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_and_its_code_never_runs(colours_eval, colours, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": checkpoint.KIND, "model": Payload(marker)}, evil)
    with pytest.raises(SystemExit) as e:
        cli(evaluate.main, [str(colours_eval), "--checkpoint", str(evil)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.run(train_args(colours, tmp_path / "r", "--mode", "transfer", "--weights", str(evil)))
    assert e.value.code == 2
    assert "needs pickled code to load (posix.system) and was refused" in capsys.readouterr().err
    assert not marker.exists()


def test_a_model_that_diverged_in_its_last_step_is_stopped_by_validation_not_kept_as_best(colours, tmp_path,
                                                                                          capsys):
    """One step an epoch at a huge lr: the training loss of that step is finite, the weights after it
    are not; validation sees NaN outputs, whose accuracy (argmax of NaN) must not make a best model."""
    with pytest.raises(SystemExit) as e:
        train.run(train_args(colours, tmp_path / "r", "--mode", "scratch", "--recipe", "seed", "--lr", "1e4",
                             "--batch-size", "64", "--epochs", "2", "--no-amp"))
    assert e.value.code == 1
    err = capsys.readouterr().err  # NaN outputs with the running statistics; finite but absurd with precise BN's
    assert "validation loss became" in err and "after epoch 1 (a uniform guess scores 1.099)" in err
    assert not (tmp_path / "r" / "best.pt").exists()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stopped"] == "diverged"


def test_a_batch_size_of_one_for_batchnorm_is_refused_and_leaves_no_folder(colours, tmp_path, capsys):
    """Bad input: so the same command with the batch size fixed can simply be run again."""
    args = train_args(colours, tmp_path / "r", "--mode", "scratch")
    with pytest.raises(SystemExit) as e:
        train.run([*args, "--batch-size", "1"])
    assert e.value.code == 2 and "--batch-size 1 cannot train" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_diverging_loss_stops_naming_the_batch_and_learning_rate(colours, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.run(train_args(colours, tmp_path / "r", "--mode", "scratch", "--recipe", "seed", "--lr", "1e30",
                             "--epochs", "3"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "batch" in err and "lr 1e+30" in err


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("slow"), per_class=30)


def metrics(run: Path) -> list[list[str]]:
    return [r.split(",")[:5] for r in (run / "metrics.csv").read_text().strip().splitlines()[1:]]


def test_a_run_killed_with_sigkill_resumes_to_the_same_result_as_an_unbroken_run(slow_data, tmp_path):
    args = ["--mode", "scratch", "--epochs", "3", "--batch-size", "4", "--optimizer", "adam", "--save-interval", "0"]
    whole = tmp_path / "whole"
    assert train.main(train_args(slow_data, whole, *args)) == 0
    broken = tmp_path / "broken"
    proc = start(train_args(slow_data, broken, *args))
    wait_for(broken / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(broken / "last.pt", weights_only=True)["epoch"]
    assert done < 3
    assert train.main(["--resume", str(broken), "--no-summary"]) == 0
    assert metrics(broken) == metrics(whole)
    assert torch.load(broken / "best.pt", weights_only=True)["best_epoch"] == \
        torch.load(whole / "best.pt", weights_only=True)["best_epoch"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_last_pt_at_once_and_says_how_to_resume(sig, slow_data, tmp_path):
    run = tmp_path / "run"
    proc = start(train_args(slow_data, run, "--mode", "scratch", "--epochs", "20", "--batch-size", "2",
                            "--save-interval", "0"))
    wait_for(run / "last.pt", proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] < 20
    assert train.main(["--resume", str(run), "--epochs", str(ckpt["epoch"] + 1), "--no-summary"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == ckpt["epoch"] + 1


def test_a_snapshot_copies_the_trained_weights_and_shares_the_frozen_ones(with_weights):
    model = build.build_model("resnet18", 3, "transfer")
    snap = heads.snapshot(model)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert not torch.equal(snap["fc.weight"], model.fc.weight)
    assert snap["conv1.weight"].data_ptr() == model.conv1.weight.data_ptr()  # frozen: never changes, not copied


def test_checkpoints_written_only_at_the_end_equal_those_written_every_epoch(colours, tmp_path):
    # patience 1 ends the run one epoch after the best, so best.pt comes from the in-memory snapshot
    args = ["--mode", "scratch", "--epochs", "8", "--optimizer", "adam", "--lr", "0.003", "--patience", "1"]
    assert train.main(train_args(colours, tmp_path / "every", *args, "--save-interval", "0")) == 0
    assert train.main(train_args(colours, tmp_path / "end", *args, "--save-interval", "3600")) == 0
    for name in ("best.pt", "last.pt"):
        every, end = (torch.load(tmp_path / run / name, weights_only=True) for run in ("every", "end"))
        assert every["epoch"] == end["epoch"] and every["best_epoch"] == end["best_epoch"]
        assert all(torch.equal(every["model"][k], end["model"][k]) for k in every["model"])
    assert end["best_epoch"] < end["epoch"]


def test_a_run_that_fails_still_writes_its_best_model_held_in_memory(colours, tmp_path, monkeypatch):
    calls = []

    def failing_on_the_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return inference.evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", failing_on_the_third_epoch)  # where the loop looks it up
    with pytest.raises(RuntimeError, match="boom"):
        train.main(train_args(colours, tmp_path / "run", "--mode", "scratch", "--epochs", "4",
                              "--save-interval", "3600"))
    assert not (tmp_path / "run" / "last.pt").exists()  # not due yet: nothing was written before the failure
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["best_epoch"] in (1, 2)


def test_the_check_command_answers_bad_input_like_every_entry_script(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "check", str(tmp_path / "nope")],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: data folder") and len(result.stderr.strip().splitlines()) == 1


def test_the_check_lists_every_look_alike_pair_in_a_file_when_it_shows_only_some(colours, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(colours, data)
    first = sorted((data / "red").iterdir())[0]
    for i in range(8):  # copies of one picture within a class: more pairs than the screen shows
        shutil.copy(first, data / "red" / f"copy-{i}.png")
    split = data_split.prepare_data(str(data), progress=False)
    assert len(split.repeats) > 10
    lines: list[str] = []
    report.report(split, lines.append, listing=tmp_path / "pairs.csv")
    text = "\n".join(lines)
    assert f"... and {len(split.repeats) - 10} more; all {len(split.repeats) + len(split.leaks)} pairs in " \
           f"{tmp_path / 'pairs.csv'}" in text
    with open(tmp_path / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(split.repeats) + len(split.leaks)
    assert {(r["image"], r["looks_like"]) for r in rows if r["kind"] == "within a class"} == \
        {(b, a) for a, b, _ in split.repeats}
