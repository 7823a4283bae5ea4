"""Folders as they really are: special files, links, odd names, rotated photos, look-alikes, many classes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, call, make_folder, make_image, train_args
from PIL import Image

import eval as evaluate
from imgcls import errors, plots
from imgcls.data import check, folders, imagecache, images
from imgcls.data import split as data_split
from imgcls.evaluation import predictor

ODD = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not UTF-8


def rotated_jpeg(upright: Image.Image, path: Path) -> None:
    """The photo stored lying on its side, with the EXIF tag that tells viewers to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright.rotate(90, expand=True).save(path, "JPEG", quality=95, exif=exif.tobytes())


def two_halves(w: int = 48, h: int = 32) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (220, 30, 30)
    a[h // 2:] = (30, 30, 220)
    return Image.fromarray(a)


def photo(size: int, seed: int = 3) -> Image.Image:
    """Something with structure, as photos have: shapes over a gradient (a noise patch has none)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.tile(np.linspace(40, 220, size)[None, :, None], (size, 1, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, size, 2).tolist()
        r = int(rng.integers(size // 10, size // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 255, 3).tolist()))
    return img


def real_folder(root: Path) -> dict[str, str]:
    """Every kind of trouble a real folder holds; returns file name -> the reason it must be skipped for."""
    make_folder(root, per_class=10, classes={"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40),
                                              "train": (200, 200, 40), "__background__": (90, 90, 90)})
    os.mkfifo(root / "red" / "pipe.jpg")
    with open(root / "green" / "video.mp4", "wb") as f:
        f.truncate(2 * 2**40)  # 2 TB, sparse
    (root / "blue" / "up").symlink_to("..")  # a loop through the data set's root
    (root / "green" / "self").symlink_to(".")  # a link to its own folder
    Image.new("1", (10000, 9000)).save(root / "red" / "bomb1.png")
    Image.new("1", (9500, 9500)).save(root / "blue" / "bomb2.png")
    (root / "red" / "figure.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    make_image((220, 40, 40), 77).save(root / "red" / f"{ODD}.png")
    (root / "__MACOSX").mkdir()
    make_image((0, 0, 0), 1).save(root / "__MACOSX" / "x.png")
    rotated_jpeg(two_halves(), root / "red" / "portrait.jpg")
    big = photo(128)
    big.save(root / "green" / "photo.png")
    buf = io.BytesIO()
    big.resize((64, 64)).save(buf, "JPEG", quality=80)
    (root / "green" / "photo-small-copy.jpg").write_bytes(buf.getvalue())
    return {"pipe.jpg": "not a regular file: a named pipe", "video.mp4": "too large for an image",
            "up": "a link loop back to a folder above it", "self": "a link loop back to a folder above it",
            "bomb1.png": "decompression bomb", "bomb2.png": "decompression bomb", "figure.eps": "not an image"}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("messy")
    return root, real_folder(root)


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, timeout=timeout,
                          env={**os.environ})


def test_a_real_folder_trains_and_evaluates_with_the_right_classes_and_each_bad_thing_named_once(messy, tmp_path):
    root, bad = messy
    result = run("train.py", "--data", str(root), "--out", str(tmp_path / "run"), "--mode", "scratch", "--epochs",
                 "1", "--img-size", "32", "--no-summary")
    assert result.returncode == 0, result.stderr[-3000:]
    split = data_split.DataSplit.load(tmp_path / "run" / "split.json")
    assert split.classes == ["__background__", "blue", "green", "red", "train"]
    assert len(split.train) + len(split.val) == 50 + 1 + 1 + 2  # + odd name, portrait, photo and its copy
    skipped = (tmp_path / "run" / "skipped.txt").read_bytes().decode("utf-8", "surrogateescape").splitlines()
    reasons = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in skipped}
    assert len(skipped) == len(bad) and reasons.keys() == bad.keys()
    assert all(reasons[name].startswith(why) for name, why in bad.items()), reasons
    assert split.ignored == [str(root / "__MACOSX")]
    assert f"{ODD}.png" in {Path(p).name for p, _ in split.train + split.val}
    pair = {str(root / "green" / "photo.png"), str(root / "green" / "photo-small-copy.jpg")}
    assert pair in [{a, b} for a, b, _ in split.leaks + split.repeats]  # the re-encoded copy is found
    evaluated = run("eval.py", str(root), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out",
                    str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 54


def test_the_check_command_names_each_bad_thing_once_and_the_ignored_folder(messy):
    root, bad = messy
    result = run("dataset.py", "check", str(root), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.decode()
    for name, why in bad.items():
        assert out.count(f"/{name}: {why}") == 1, name
    assert "__MACOSX" in out


def test_a_fifo_is_skipped_without_being_opened(tmp_path):
    make_folder(tmp_path, per_class=2)
    os.mkfifo(tmp_path / "red" / "pipe.png")
    split = data_split.prepare_data(str(tmp_path))  # reading the pipe would block: pytest-timeout ends the test
    assert (str(tmp_path / "red" / "pipe.png"), "not a regular file: a named pipe (FIFO)") in split.left_out
    with pytest.raises(images.BadImage, match="named pipe"):
        images.load_image(tmp_path / "red" / "pipe.png", 32)  # even when asked directly: no blocking open


def test_an_exif_rotated_photo_is_seen_upright_on_every_path(tmp_path, trained_run):
    upright = two_halves()
    upright.save(tmp_path / "upright.png")
    rotated_jpeg(upright, tmp_path / "rotated.jpg")
    want = images.load_image(tmp_path / "upright.png", 32).astype(int)
    got = images.load_image(tmp_path / "rotated.jpg", 32).astype(int)  # training and evaluation
    assert np.abs(got - want).mean() < 8
    assert got[2, 16, 0] > 150 and got[30, 16, 2] > 150  # red on top, blue below: as a person sees it
    cache = imagecache.ImageCache([str(tmp_path / "rotated.jpg")], 32, str(tmp_path / "c"))
    check.check_files(cache.paths, str(tmp_path / "c"), progress=False, fill=cache)  # the check fills it
    assert np.abs(cache.get(str(tmp_path / "rotated.jpg")).astype(int) - want).mean() < 8
    assert predictor.thumbnail(str(tmp_path / "rotated.jpg")).shape[:2] == (32, 48)  # pictures: upright
    loaded = predictor.load_model(str(trained_run / "best.pt"), "cpu")
    items = [(str(tmp_path / "upright.png"), 0), (str(tmp_path / "rotated.jpg"), 0)]
    logits, _, _ = predictor.run_model(loaded, items, 2, 0, show=False)
    probs = logits.softmax(1)  # (the logits of a net whose BatchNorm statistics come from flat colours are
    assert float((probs[0] - probs[1]).abs().max()) < 0.1  # sensitive to JPEG noise): nearly the same picture


def test_a_class_called_train_in_a_flat_folder_is_a_class(tmp_path):
    make_folder(tmp_path, per_class=3, classes={"bus": (1, 2, 3), "car": (200, 2, 3), "train": (1, 200, 3)})
    assert folders.find_layout(tmp_path) == (tmp_path, None, None)
    assert data_split.prepare_data(str(tmp_path)).classes == ["bus", "car", "train"]


def test_a_train_folder_with_sub_folders_beside_class_folders_is_ambiguous_and_says_how_to_fix_it(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path, per_class=2, classes={"bus": (1, 2, 3)})
    with pytest.raises(errors.UsageError, match="move bus under train/"):
        folders.find_layout(tmp_path)


def test_many_classes_draw_a_bounded_confusion_picture(tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(5, 20, n)) + (rng.random((n, n)) < 0.002)
    plots.save(plots.confusion_figure(cm, [f"class {i}" for i in range(n)]), tmp_path / "cm.png")
    assert max(Image.open(tmp_path / "cm.png").size) < 5000


def test_look_alikes_are_found_among_many_images():
    rng = np.random.default_rng(0)
    looks = {f"t{i}": rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for i in range(20000)}
    flipped = bytearray(bytes.fromhex(looks["t7"]))
    flipped[0] ^= 0b111  # three bits off: the same photo, re-encoded
    looks["v0"] = flipped.hex()
    looks |= {f"v{i}": rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for i in range(1, 5000)}
    pairs = check.lookalikes([f"t{i}" for i in range(20000)], [f"v{i}" for i in range(5000)], looks)
    assert pairs == [("t7", "v0", 3)]


def split_with_test(root: Path) -> Path:
    make_folder(root / "train", per_class=4, classes={"a": (200, 30, 30), "b": (30, 200, 30)})
    make_folder(root / "test", per_class=2, classes={"a": (200, 30, 30), "b": (30, 200, 30)}, offset=90)
    return root


def test_a_link_loop_inside_test_adds_nothing_to_eval_test_or_export(tmp_path, capsys):
    from imgcls.export import parity
    from imgcls.preprocess import Preprocess

    root = split_with_test(tmp_path / "d")
    (root / "test" / "a" / "up").symlink_to("../..")
    (root / "train" / "b" / "up").symlink_to("..")
    _, items, skipped, _, _ = check.scan_folder(root)
    assert len(items) == 4 and any("a link loop back" in r for _, r in skipped)
    assert len(check.list_files(root / "test")) == 4  # test.py's folder listing
    _, labels = parity.sample_images(str(root), Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3), 100, ["a", "b"])
    assert sorted(labels) == [0] * 4 + [1] * 4  # train/b/up/a/... is not labelled b


def test_a_link_into_another_class_does_not_take_its_images(tmp_path):
    make_folder(tmp_path, per_class=4, classes={"a": (200, 30, 30), "b": (30, 200, 30)})
    make_folder(tmp_path / "b" / "sub", per_class=3, classes={"x": (30, 200, 30)}, offset=40)
    (tmp_path / "a" / "more").symlink_to("../b/sub")
    (tmp_path / "a" / "zz.png").symlink_to("../b/b_000.png")
    split = data_split.prepare_data(str(tmp_path))
    assert split.counts(split.train + split.val) == [4, 7]
    assert {Path(p).name for p, r in split.left_out if "a link into" in r} == {"more", "zz.png"}


def test_a_file_named_directly_is_read_only_if_it_is_a_regular_file_of_a_sane_size(tmp_path, trained_run):
    with open(tmp_path / "movie.jpg", "wb") as f:
        f.truncate(2 * 2**40)
    make_image((200, 30, 30), 1).save(tmp_path / "ok.png")
    result = run("test.py", str(tmp_path / "movie.jpg"), str(tmp_path / "ok.png"), "--checkpoint",
                 str(trained_run / "best.pt"), "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "movie.jpg: unreadable (too large for an image" in result.stdout.decode()


def test_a_hard_link_of_a_training_image_in_test_is_reported_as_leakage(tmp_path):
    root = split_with_test(tmp_path / "d")
    os.link(root / "train" / "a" / "a_000.png", root / "test" / "a" / "copy.png")
    split = data_split.prepare_data(str(root))
    assert (str(root / "train" / "a" / "a_000.png"), str(root / "test" / "a" / "copy.png"), 0) in split.leaks


def test_another_path_to_a_training_image_beside_it_is_no_leak(tmp_path):
    """Skipped as the same file, it is neither trained nor validated on: nothing leaks."""
    root = make_folder(tmp_path / "d", per_class=6)
    (root / "blue" / "link.png").symlink_to(root / "blue" / "blue_000.png")
    os.link(root / "red" / "red_000.png", root / "red" / "hard.png")
    split = data_split.prepare_data(str(root))
    pairs = [{str(root / "blue" / "link.png"), str(root / "blue" / "blue_000.png")},
             {str(root / "red" / "hard.png"), str(root / "red" / "red_000.png")}]
    skipped = {p for p, _ in split.left_out}
    assert all(len(pair & skipped) == 1 for pair in pairs)  # one path of each is used, the other skipped
    assert not [leak for leak in split.leaks if set(leak[:2]) in pairs]


def test_names_with_tabs_and_line_breaks_stay_one_line_in_skipped_txt(tmp_path):
    make_folder(tmp_path / "d", per_class=3)
    (tmp_path / "d" / "red" / "bad\tname\n.png").write_text("not an image")
    assert run("train.py", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--mode", "scratch",
               "--epochs", "1", "--img-size", "32", "--no-summary").returncode == 0
    lines = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0].endswith("bad\\tname\\n.png")


@pytest.mark.parametrize("second", ["valid", "Train"])
def test_two_folders_for_one_split_are_refused(second, tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=2)
    make_folder(tmp_path / second, per_class=2)
    with pytest.raises(errors.UsageError, match="keep one"):
        folders.find_layout(tmp_path)


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    make_folder(tmp_path, per_class=3)
    (tmp_path / "scarlet").symlink_to("red")
    with pytest.raises(errors.UsageError, match="are the same folder"):
        data_split.prepare_data(str(tmp_path))


def test_big_images_are_not_decoded_all_at_once():
    import threading

    budget, inside, most = images.DecodeBudget(100), [0], [0]
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        with budget.take(pixels):
            with lock:
                inside[0] += pixels
                most[0] = max(most[0], inside[0])
            threading.Event().wait(0.05)
            with lock:
                inside[0] -= pixels

    threads = [threading.Thread(target=decode, args=(60,)) for _ in range(4)] + \
        [threading.Thread(target=decode, args=(150,))]  # over the budget alone: it still runs, alone
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] <= 150 and inside[0] == 0


def test_eval_and_test_py_take_the_same_file_size_limit(trained_run, tmp_path, capsys):
    import test as predict

    data = make_folder(tmp_path / "d", per_class=2)
    big = data / "red" / "big.png"
    make_image((220, 40, 40), 9, 256).save(big)  # ~190 KB of noise; the others are ~3 KB
    assert evaluate.main([str(data), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "eval"),
                          "--max-file-mb", "0.05"]) == 0
    assert (tmp_path / "eval" / "skipped.txt").read_text().startswith(f"{big}\ttoo large for an image")
    assert predict.main([str(big), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "p"),
                         "--max-file-mb", "0.05"]) == 0
    assert "unreadable (too large for an image" in capsys.readouterr().out


def test_dollar_signs_in_class_file_and_run_names_are_drawn_as_text_not_math(tmp_path, capsys):
    """Matplotlib reads the text between two $ as a formula ($100_$ is a broken one): every name is the
    user's text. Training to its last epoch (curves, confusion figure), eval.py, test.py and --explain."""
    import test as predict
    import train

    data = make_folder(tmp_path / "d", per_class=8, classes={"$0-$100": (200, 30, 30), "$100_$200": (30, 200, 30),
                                                              "cheap": (30, 30, 200)})
    make_image((30, 200, 30), 99).save(data / "$100_$200" / "invoice_$100_$200.png")
    run_dir = tmp_path / "run_$1_$2"
    assert call(train.main, train_args(data, run_dir, "--mode", "scratch", "--epochs", "2")) == 0
    assert (run_dir / "summary.json").exists() and (run_dir / "curves.png").exists()
    assert call(evaluate.main, [str(data), "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert call(predict.main, [str(data / "$100_$200"), "--checkpoint", str(run_dir), "--explain", "--out",
                               str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "explanations.png").exists()
    assert "Traceback" not in capsys.readouterr().err
