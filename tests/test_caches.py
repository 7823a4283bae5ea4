"""Caches that cannot serve old data, files that cannot be hijacked, and many runs at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_folder, make_image, train_args

import train
from imgcls import checkpoint, files, machine, settings
from imgcls.data import check, imagecache, images
from imgcls.data import split as data_split
from imgcls.preprocess import Preprocess
from imgcls.training import features


def replace_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What `cp -p` or rsync does: other content, same size, the old modification time."""
    st = path.stat()
    assert len(data) == st.st_size
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


def bmp_folder(root: Path, per_class: int = 8) -> Path:
    """BMP files: every image of a size has the same byte count, so contents can be swapped unnoticed by size."""
    colours = {"blue": (30, 60, 220), "red": (220, 40, 40), "green": (40, 200, 60)}
    for c, (name, colour) in enumerate(colours.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(colour, 1000 * c + i).save(root / name / f"{i:02d}.bmp")
    return root


def test_the_file_check_notices_a_file_replaced_by_another_of_the_same_size_and_mtime(tmp_path):
    data = bmp_folder(tmp_path / "d")
    path = data / "red" / "00.bmp"
    assert check.check_files([str(path)])[str(path)][0] is None
    replace_keeping_size_and_mtime(path, b"x" * path.stat().st_size)
    assert check.check_files([str(path)])[str(path)][0].startswith("not an image")


@pytest.mark.parametrize("kind", ["folder", "label file"])
def test_a_remembered_file_check_is_decided_again_under_another_max_file_mb(kind, tmp_path):
    """"Too large" depends on --max-file-mb, not on the file: a remembered check must not outlive the limit."""
    from conftest import write_labels_csv

    root = make_folder(tmp_path / "d", per_class=4)  # 32 px noise PNGs: about 3 KB each
    for name, colour in (("blue", (30, 60, 220)), ("red", (220, 40, 40)), ("green", (40, 200, 60))):
        make_image(colour, 7, 64).save(root / name / "big.png")  # about 12 KB
    data = str(root) if kind == "folder" else str(write_labels_csv(
        tmp_path / "labels.csv", ["path", "label"], [[str(p), p.parent.name] for p in sorted(root.glob("*/*.png"))]))
    def too_large(max_file_mb: float) -> list[str]:
        split = data_split.prepare_data(data, cache_dir=str(tmp_path / "c"), max_file_mb=max_file_mb)
        return sorted(Path(p).name for p, r in split.skipped + split.left_out if r.startswith("too large"))

    assert too_large(0.006) == ["big.png"] * 3
    assert too_large(256) == []
    assert too_large(0.006) == ["big.png"] * 3  # and an image remembered as fine is too large for a smaller limit


def test_the_image_cache_key_changes_when_a_file_is_replaced_by_one_of_the_same_size_and_mtime(tmp_path):
    data = bmp_folder(tmp_path / "d")
    paths = sorted(str(p) for p in data.rglob("*.bmp"))
    before = imagecache.ImageCache(paths, 32, str(tmp_path / "cache")).path
    replace_keeping_size_and_mtime(Path(paths[0]), Path(paths[-1]).read_bytes())
    assert imagecache.ImageCache(paths, 32, str(tmp_path / "cache")).path != before


def test_the_feature_cache_never_serves_features_of_files_that_were_replaced(tmp_path, with_weights):
    data = bmp_folder(tmp_path / "d")
    args = ("--mode", "transfer", "--epochs", "2", "--optimizer", "adam", "--lr", "0.01", "--no-image-cache")
    assert train.main(train_args(data, tmp_path / "first", *args)) == 0
    # swap the pictures of two classes: same names, sizes and mtimes, other content
    for i in range(8):
        red, blue = data / "red" / f"{i:02d}.bmp", data / "blue" / f"{i:02d}.bmp"
        r, b = red.read_bytes(), blue.read_bytes()
        replace_keeping_size_and_mtime(red, b)
        replace_keeping_size_and_mtime(blue, r)
    assert train.main(train_args(data, tmp_path / "cached", *args)) == 0
    assert train.main(train_args(data, tmp_path / "fresh", *args, "--cache-dir", str(tmp_path / "empty"))) == 0
    history = lambda run: (run / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:5] for r in history(tmp_path / "cached")] == \
        [r.split(",")[:5] for r in history(tmp_path / "fresh")]


def test_the_feature_cache_key_covers_the_precision(tmp_path, monkeypatch, colours):
    split = data_split.prepare_data(str(colours))
    pre = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3)
    keys = set()
    for bf16 in (False, True):
        monkeypatch.setattr(machine, "cpu_has_bf16", lambda bf16=bf16: bf16)
        keys.add(features.feature_key(settings.TrainConfig(mode="transfer"), ["w"], pre, split, torch.device("cpu")))
    assert len(keys) == 2


def test_the_feature_cache_key_covers_the_decoding_of_the_pixels(monkeypatch, colours):
    """Features of images decoded another way (EXIF orientation, 16-bit scaling) are not served again."""
    split = data_split.prepare_data(str(colours))
    pre = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3)
    keys = set()
    for version in (imagecache.CACHE_VERSION, imagecache.CACHE_VERSION + 1):
        monkeypatch.setattr(imagecache, "CACHE_VERSION", version)
        keys.add(features.feature_key(settings.TrainConfig(mode="transfer"), ["w"], pre, split, torch.device("cpu")))
    assert len(keys) == 2


def test_a_planted_link_at_a_temp_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "cache.pt"
    for name in (f".{target.name}.tmp", f".{target.name}.{os.getpid()}.tmp", f".{target.name}.tmp.npy"):
        (tmp_path / name).symlink_to(victim)
    checkpoint.save({"new": 1}, target)
    assert victim.read_text() == "precious" and torch.load(target, weights_only=True) == {"new": 1}


def test_a_cache_file_that_is_a_link_is_replaced_not_read_or_written(colours, tmp_path):
    paths = sorted(str(p) for p in colours.rglob("*.png"))
    cache = imagecache.ImageCache(paths, 32, str(tmp_path))
    victim = tmp_path / "victim.npy"
    np.save(victim, np.zeros((len(paths), 32, 32, 3), np.uint8))
    before = victim.read_bytes()
    cache.path.symlink_to(victim)
    cache.ok_path.symlink_to(victim)
    cache.build(progress=False)
    assert victim.read_bytes() == before
    assert not cache.path.is_symlink() and cache.get(paths[0]).any()


@pytest.mark.parametrize("damage", ["truncated", "wrong shape"])
def test_a_damaged_image_cache_is_rebuilt_not_trusted(damage, colours, tmp_path):
    paths = sorted(str(p) for p in colours.rglob("*.png"))
    imagecache.ImageCache(paths, 32, str(tmp_path)).build(progress=False)
    cache = imagecache.ImageCache(paths, 32, str(tmp_path))
    if damage == "truncated":
        with open(cache.path, "r+b") as f:
            f.truncate(1000)
    else:
        np.save(cache.path, np.zeros((3, 32, 32, 3), np.uint8))
    assert not cache.ready
    cache.build(progress=False)
    assert np.array_equal(cache.get(paths[5]), images.load_image(paths[5], 32))


def test_a_damaged_feature_cache_is_rebuilt(colours, tmp_path, with_weights, capsys):
    args = ("--mode", "transfer", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"))
    assert train.main(train_args(colours, tmp_path / "first", *args)) == 0
    (feature_file,) = (tmp_path / "cache" / "features").glob("*.pt")
    torch.save({"train": torch.zeros(2, 3)}, feature_file)
    assert train.main(train_args(colours, tmp_path / "second", *args)) == 0
    assert "rebuilding a damaged feature cache" in capsys.readouterr().err
    assert (tmp_path / "first" / "metrics.csv").read_text().split(",")[:12] == \
        (tmp_path / "second" / "metrics.csv").read_text().split(",")[:12]


def test_a_cache_build_that_loses_a_race_leaves_no_temp_file(colours, tmp_path):
    paths = sorted(str(p) for p in colours.rglob("*.png"))
    loser = imagecache.ImageCache(paths, 32, str(tmp_path))
    loser.begin()  # the check started filling it, while another process finishes first:
    other = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from imgcls.data import imagecache; "
             f"imagecache.ImageCache({paths!r}, 32, {str(tmp_path)!r}).build(progress=False)")
    subprocess.run([sys.executable, "-c", other], check=True)
    loser.build(progress=False)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted([loser.path.name, loser.ok_path.name])


def test_runs_started_together_finish_in_their_own_folders_and_leave_no_temp_files(tmp_path):
    data = make_folder(tmp_path / "data", per_class=10)
    env = {**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--mode", "scratch", "--epochs", "1",
           "--img-size", "32", "--no-summary", "--save-interval", "0"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in results]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3 and all((r / "best.pt").is_file() and (r / "summary.json").is_file() for r in runs)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert leftovers == []


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, colours, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                               "from imgcls import files; "
                               f"lock = files.FolderLock({str(run)!r}); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # claimed, nothing written yet
        with pytest.raises(SystemExit) as e:
            train.run(train_args(colours, run, "--mode", "scratch"))
        assert e.value.code == 2 and "in use by another train.py" in capsys.readouterr().err
    finally:
        holder.communicate("")
    assert [p.name for p in run.iterdir()] == [files.FolderLock.NAME]
    assert train.main(train_args(colours, run, "--mode", "scratch")) == 0  # free again once it ended


def test_images_are_resized_with_the_interpolation_asked_for_and_cached_apart(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    cubic = images.load_image(path, 20, interpolation="bicubic")
    linear = images.load_image(path, 20)
    expected = Image.open(path).convert("RGB").resize((20, 20), Image.BICUBIC, box=(10, 0, 60, 50), reducing_gap=3.0)
    assert np.array_equal(cubic, np.asarray(expected)) and not np.array_equal(cubic, linear)
    caches = [imagecache.ImageCache([str(path)], 20, str(tmp_path / "c"), interpolation=i)
              for i in ("bilinear", "bicubic")]
    assert caches[0].path != caches[1].path
    for cache in caches:
        cache.build(progress=False)
    assert np.array_equal(caches[1].get(str(path)), cubic) and np.array_equal(caches[0].get(str(path)), linear)


def test_a_checkpoint_from_before_interpolation_was_saved_resizes_bilinearly():
    old = {"img_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_dict(old).interpolation == "bilinear"
    assert Preprocess.from_dict({**old, "interpolation": "bicubic"}).interpolation == "bicubic"


def test_bilinear_caches_keep_the_keys_they_had_before_interpolation_was_keyed(tmp_path):
    """Caches built before stay valid: only another interpolation changes a key."""
    from imgcls.data import compactcache

    path = make_folder(tmp_path / "d", per_class=1) / "red" / "red_000.png"
    cache = imagecache.make_cache("compact", [str(path)], 20, str(tmp_path / "c"))
    before = compactcache.CompactCache([str(path)], 20, None, imagecache.CACHE_VERSION, str(tmp_path / "c"))
    assert cache.path == before.path
    cubic = imagecache.make_cache("compact", [str(path)], 20, str(tmp_path / "c"), interpolation="bicubic")
    assert cubic.path != before.path
