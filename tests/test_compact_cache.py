"""The compact image cache (--image-cache compact): JPEGs of the raw cache's pictures in one data file,
a tenth of the size, rebuilt when damaged, chosen by auto when the raw cache would not fit."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import call, train_args
from PIL import Image, ImageDraw

import train
from imgcls import files, settings
from imgcls.data import compactcache, imagecache, images


def make_photos(root: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """Photo-like pictures: shaded backgrounds with shapes and a little noise, saved as JPEGs."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(40, 220, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(20, 150)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        paths.append(str(root / f"{i:03d}.jpg"))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[-1], quality=92)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    return make_photos(tmp_path_factory.mktemp("photos"), 12)



def built(kind: str, paths: list[str], size: int = 256):
    cache = imagecache.make_cache(kind, paths, size)
    cache.build(progress=False)
    return cache


def test_the_compact_cache_holds_the_raw_caches_pictures_within_jpeg_error(photos):
    raw, compact = built("raw", photos), built("compact", photos)
    for p in photos:
        a, b = raw.get(p).astype(float), compact.get(p).astype(float)
        assert b.shape == (256, 256, 3)
        assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 32  # PSNR in dB


def test_the_compact_cache_takes_at_most_40_kb_per_image_at_256_px(photos):
    compact = built("compact", photos)
    assert compact.path.stat().st_size / len(photos) < 40_000


def test_an_unreadable_image_is_none_in_the_compact_cache(photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a picture")
    compact = built("compact", [*photos[:2], str(bad)])
    assert compact.get(str(bad)) is None and compact.get(photos[0]) is not None


@pytest.mark.parametrize("damage", ["truncate", "tail", "foreign"])
def test_a_damaged_compact_cache_is_rebuilt_not_trusted(damage, photos, capsys):
    compact = built("compact", photos[:3])
    data = compact.path.read_bytes()
    if damage == "truncate":
        compact.path.write_bytes(data[:100])
    elif damage == "tail":
        compact.path.write_bytes(data[:-3])
    else:  # another cache's file (of 2 images) under this one's name
        compact.path.write_bytes(built("compact", photos[3:5]).path.read_bytes())
    again = imagecache.make_cache("compact", photos[:3], 256)
    assert not again.ready and "rebuilding a damaged image cache" in capsys.readouterr().err
    again.build(progress=False)
    assert again.ready and again.get(photos[1]) is not None


def test_auto_chooses_the_compact_cache_when_the_raw_one_would_not_fit(colours, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(imagecache, "RAW_SHARE_OF_FREE_DISK", 0.0)
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))  # no cache of these images built yet
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch")) == 0
    assert "image cache: compact (auto: the raw cache would not fit" in capsys.readouterr().out
    assert list((Path(settings.cache_root()) / "images").glob("*.jpgs"))


def test_settings_saved_with_the_cache_on_or_off_still_read():
    assert settings.TrainConfig(image_cache=True).image_cache == "auto"
    assert settings.TrainConfig(image_cache=False).image_cache == "none"


def test_the_index_and_the_images_are_one_file_published_whole(photos):
    compact = built("compact", photos[:3])
    assert [p.name for p in compact.path.parent.iterdir() if p.name.startswith(compact.path.name[:20])] == \
        [compact.path.name]


def test_a_damaged_image_inside_the_compact_cache_is_decoded_from_its_file_with_a_warning(photos, capsys):
    """The file itself is intact: the damaged entry must not change a result (an image left out)."""
    compact = built("compact", photos[:3])
    fd = os.open(compact.path, os.O_RDONLY)
    offset, length = (int(v) for v in compactcache.read_index(fd, 3)[1])
    os.close(fd)
    data = bytearray(compact.path.read_bytes())
    data[offset + 2:offset + length] = bytes(length - 2)  # the second image's JPEG, zeroed after its marker
    compact.path.write_bytes(bytes(data))
    again = imagecache.make_cache("compact", photos[:3], 256)
    assert again.ready and again.get(photos[0]) is not None
    assert np.array_equal(again.get(photos[1]), images.load_image(photos[1], 256))
    assert "is damaged" in capsys.readouterr().err


def test_auto_keeps_the_cache_already_built(photos, monkeypatch):
    built("raw", photos[:4])
    monkeypatch.setattr(imagecache, "RAW_SHARE_OF_FREE_DISK", 0.0)  # a raw cache would no longer fit
    assert imagecache.cache_kind("auto", photos[:4], 256) == "raw"
    assert imagecache.cache_kind("auto", photos[4:8], 256) == "compact"


def test_the_feature_cache_of_compact_pixels_is_not_the_exact_ones(colours, tmp_path, with_weights, capsys):
    for kind in ("compact", "raw"):
        assert train.main(train_args(colours, tmp_path / kind, "--mode", "transfer", "--image-cache", kind)) == 0
    names = re.findall(r"cached backbone features \((\w+)\.pt\)", capsys.readouterr().out)
    assert len(names) == 2 and names[0] != names[1]


def test_a_full_disk_under_the_raw_cache_is_one_line_and_leaves_nothing(colours, tmp_path, monkeypatch, capsys):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))  # no cache of these images built yet
    assert call(train.main, train_args(colours, tmp_path / "run", "--mode", "scratch", "--image-cache", "raw")) == 2
    err = capsys.readouterr().err
    assert "no space left for the image cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert not list((Path(settings.cache_root()) / "images").glob("*.tmp"))


def test_a_full_disk_under_the_compact_cache_is_one_line_and_leaves_nothing(colours, tmp_path, monkeypatch, capsys):
    """A buffered write fails when it is flushed: by the seek before the next image's bytes, or at the end."""
    real = files.open_temp

    class Full:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def seek(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_temp(path):
        f, temp = real(path)
        return Full(f), temp

    monkeypatch.setattr(files, "open_temp", open_temp)
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    assert call(train.main, train_args(colours, tmp_path / "run", "--mode", "scratch", "--image-cache", "compact")) == 2
    err = capsys.readouterr().err
    assert "no space left for the image cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert not [p for p in (Path(settings.cache_root()) / "images").iterdir() if p.name.startswith(".")]


def test_temp_files_of_a_killed_cache_build_are_removed_by_the_next_build(photos, tmp_path):
    from imgcls import files

    folder = tmp_path / "images"
    folder.mkdir()
    left, _ = files.open_temp(folder / "x.jpgs")  # a killed build's file: closed, its lock gone
    left.close()
    alive, alive_path = files.open_temp(folder / "y.jpgs")  # a build still going: open and locked
    for p in folder.iterdir():
        os.utime(p, (1, 1))  # both old
    files.remove_stale_temps(folder)
    assert [p.name for p in folder.iterdir()] == [alive_path.name]
    alive.close()


def test_eval_evaluates_through_a_compact_cache_as_through_none(trained_run, colours_eval, tmp_path, monkeypatch):
    """eval.py takes --image-cache KIND as train.py does: a large evaluation set need not fit raw on disk."""
    import json

    import eval as evaluate

    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    accuracy = {}
    for kind in ("compact", "none"):
        out = tmp_path / kind
        assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run), "--image-cache", kind,
                                    "--out", str(out)]) == 0
        accuracy[kind] = json.loads((out / "metrics.json").read_text())["accuracy"]
    assert list((tmp_path / "cache" / "images").glob("*.jpgs")) and not list((tmp_path / "cache" / "images").glob(
        "*.npy"))
    assert accuracy["compact"] == pytest.approx(accuracy["none"], abs=1e-9)


def test_eval_chooses_the_compact_cache_when_the_raw_one_would_not_fit(trained_run, colours_eval, tmp_path,
                                                                       monkeypatch, capsys):
    import eval as evaluate

    monkeypatch.setattr(imagecache, "RAW_SHARE_OF_FREE_DISK", 0.0)
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run), "--out", str(tmp_path / "r")]) == 0
    assert "image cache: compact (auto" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "images").glob("*.jpgs"))
