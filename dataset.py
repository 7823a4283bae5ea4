"""Image folders: find classes and files, check every file once, split, decode, cache and augment.

    python dataset.py check DIR          # counts, imbalance, skipped files and why, train/val leaks
    python dataset.py check DIR --folds 5   # what each fold of train.py --folds 5 validates on
    python dataset.py demo               # export scikit-learn's digits as PNGs (data/digits/{train,test})

Every image, whatever its mode (L, LA, P, RGBA, CMYK, 16-bit, float), becomes 3-channel uint8 RGB,
resized so its shorter side is `resize_size` and centre-cropped square. Training crops randomly
from that square; evaluation takes its centre: the standard Resize + CenterCrop recipe, done once.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line, answered before torch is imported (--help, typos, a missing folder)
    import argparse
    import os
    import sys

    from folders import check_cache_outside
    from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
    from imgcls.errors import UsageError
    from imgcls.settings import TrainConfig, validate
    from labels import check_sep_applies

    def main(argv: list[str] | None = None) -> int:
        parser = Parser("Check an image folder, or export the demo digits.", prog="dataset.py")
        sub = parser.add_subparsers(dest="command", required=True)
        check = sub.add_parser("check", help="scan a dataset folder and report what training will use")
        check.add_argument("data", help="dataset folder, label file (.csv) or 'demo'")
        check.add_argument("--val-split", type=float, default=TrainConfig.val_split, help="share of each class held "
                           "out for validation when DATA has no val/ folder")
        check.add_argument("--test-split", type=float, default=TrainConfig.test_split, help="share of each class set "
                           "aside as the run's test set, as train.py --test-split sets it aside")
        check.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed of the split")
        check.add_argument("--folds", type=int, default=0, help="show the K folds train.py --folds K would "
                           "validate on (per class), and look-alikes that fall in two folds")
        check.add_argument("--label-sep", help="what separates the labels in a label file's labels column "
                           "(multi-label; default: a space)")
        add_shared(check, "cache_dir", "max_file_mb")
        sub.add_parser("demo", help="export the digits demo data to data/digits/ beside this script")
        args = parser.parse_args(argv)
        if args.command == "check":
            check_command_line(args)
        import dataset  # the library: torch and all, only now
        imports_done()

        if args.command == "demo":
            print(dataset.export_demo())
            return 0
        splits = [dataset.prepare_data(args.data, args.val_split, args.seed, args.cache_dir, progress=fold <= 1,
                                       max_file_mb=args.max_file_mb, test_split=args.test_split, folds=args.folds,
                                       fold=fold, label_sep=args.label_sep or TrainConfig.label_sep)
                  for fold in range(1 if args.folds else 0, args.folds + 1)]  # each fold as its run gets it
        listing = dataset.lookalikes_file(splits[0].root, args.cache_dir)  # all the pairs, when not all are shown
        dataset.report_folds(splits, listing=listing) if args.folds else dataset.report(splits[0], listing=listing)
        return 0

    def check_command_line(args: argparse.Namespace) -> None:
        """What train.py refuses up front, refused here by the same rules (config.validate)."""
        check_shared(args)
        validate(TrainConfig(val_split=args.val_split, test_split=args.test_split, seed=args.seed, folds=args.folds))
        path = os.path.expanduser(args.data)
        what = "a folder with one sub-folder per class, a label file (.csv) or demo"
        if not args.data.strip():
            raise UsageError(f"no data given: give {what}")
        if args.data == "demo" or os.path.isdir(path) or (args.data.lower().endswith(".csv") and os.path.isfile(path)):
            check_sep_applies(args.data, args.label_sep)
            check_cache_outside(None if args.data == "demo" else path, args.cache_dir)
            return
        if os.path.exists(path):
            raise UsageError(f"{args.data} is not a folder: give {what}")
        kind = "label file" if args.data.lower().endswith(".csv") else "data folder"
        raise UsageError(f"{kind} {args.data} does not exist: give {what}")

    script(main, __file__)

import contextlib
import functools
import hashlib
import io
import json
import os
import sys
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

import compact_cache
import folders
import labels
import multilabel
import splits
from compact_cache import CompactCache
from folders import shown
from imgcls import files
from imgcls.cli import Parser, add_shared
from imgcls.errors import UsageError
from imgcls.settings import TrainConfig, cache_root
from splits import class_counts, derived_seed, fold_split, stratified_split

IMAGE_EXTENSIONS = folders.IMAGE_EXTENSIONS
DEMO_DIR = Path(__file__).resolve().parent / "data" / "digits"
ACCEPTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                  "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CHECK_VERSION = 5  # 2: keyed by ctime too; 3: perceptual hashes, EXIF orientation; 4: pHash; 5: 16-bit mode I
CACHE_VERSION = 4  # of the decoded pixels: a change in decoding makes new caches (3: EXIF orientation; 4: mode I)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a half-downloaded file is an error, never grey pixels


# ----------------------------------------------------------------------------- decoding

class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any accepted mode to RGB: alpha over white, 16-bit scaled to 8-bit (not clipped). Integer modes
    are scaled by their depth, never by their content: Pillow opens 16-bit PGM/PPM (scaled to 0..65535)
    and 32-bit TIFF as I, read as 16-bit, so a dark exposure stays dark."""
    mode = img.mode
    if mode not in ACCEPTED_MODES:
        raise BadImage(f"unsupported mode {mode}")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if mode.startswith("I"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# Pillow opens these formats and nothing else: never EPS (Ghostscript), PDF or the rarer plugins
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG also opens MPO (multi-picture) photos
# the pixel limit is checked from the header in open_image(), the same way in every thread: Pillow's
# own warning for it goes through the process-wide warnings filter, which threads cannot share safely
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class DecodeBudget:
    """Pixels being decoded at once in this process, bounded: images near the pixel limit (several GB
    each once decoded) wait for each other instead of being decoded on every core at once."""

    def __init__(self, pixels: int):
        self.limit, self.used, self.cond = pixels, 0, threading.Condition()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


BUDGET = DecodeBudget(MAX_PIXELS)


MAX_BYTES = folders.DEFAULT_MAX_BYTES


def read_file(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Anything else (a FIFO, a device, a 2 TB
    sparse file) is refused from fstat() after a non-blocking open, on every path that reads images:
    a file may have changed since the folder was listed, or be named directly (test.py)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        problem = folders.special_file(st.st_mode) or folders.too_large(st.st_size, max_bytes)
        if problem:
            raise BadImage(problem)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None
    finally:
        os.close(fd)


def open_image(source: bytes, draft: int | None = None) -> Image.Image:
    """Decode fully (so truncation shows now) and upright (the EXIF orientation applied, as every viewer
    shows a phone photo); JPEGs at a reduced scale when `draft` allows. The pixel limit is checked
    from the header, before any decoding."""
    try:
        img = Image.open(io.BytesIO(source), formats=FORMATS)
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(f"decompression bomb (too many pixels: {img.width} x {img.height})")
        if draft and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft, draft))  # DCT scaling: keeps both sides >= draft
        with BUDGET.take(img.width * img.height):
            img.load()
    except Image.DecompressionBombError:
        raise BadImage("decompression bomb (too many pixels)") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"not an image (or not one of {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("truncated" if "truncat" in str(e).lower() else f"unreadable ({e})") from None
    return upright(img)


def upright(img: Image.Image) -> Image.Image:
    """The EXIF orientation applied (phones store portraits lying on their side, with a tag)."""
    try:
        if img.getexif().get(ORIENTATION, 1) in range(2, 9):
            return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the pixels as stored
        pass
    return img


ORIENTATION = 0x0112


def decode(path: str | os.PathLike, draft: int | None = None, max_bytes: int = MAX_BYTES) -> Image.Image:
    """A file as an upright RGB picture (see open_image and to_rgb)."""
    return to_rgb(open_image(read_file(path, max_bytes), draft))


def load_image(path: str | os.PathLike, size: int, max_bytes: int = MAX_BYTES, interpolation: str = "bilinear"
               ) -> np.ndarray:
    """Decode to a size x size x 3 uint8 array: shorter side resized to `size`, centre crop (or as the
    crop mode in `interpolation` says: square)."""
    return square(decode(path, size, max_bytes), size, interpolation)


FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}  # (antialiased when shrinking)


def square(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The size x size picture every dataset and cache holds, resized with `interpolation`: the shorter side
    resized and the centre cropped; or, after a '/' (checkpoint.Preprocess.resample: timm's crop modes),
    'squash' (the whole picture resized to the square) or 'border/R,G,B' (its longer side resized, centred
    on a square of that colour)."""
    name, _, mode = interpolation.partition("/")
    w, h = img.size
    if mode.startswith("border/"):
        inner = (max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h))))
        fill = tuple(int(v) for v in mode.split("/")[1].split(","))
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img.resize(inner, FILTERS[name], reducing_gap=3.0), ((size - inner[0]) // 2,
                                                                        (size - inner[1]) // 2))
        return np.array(canvas, dtype=np.uint8)
    s = min(w, h)
    box = (0, 0, w, h) if mode == "squash" else ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    img = img.resize((size, size), FILTERS[name], box=box, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def look_hash(img: Image.Image) -> str:
    """A 256-bit perceptual hash (pHash: the signs of the lowest 16 x 16 DCT frequencies of a 32 x 32
    grey thumbnail against their median), or "plain" for a picture with next to no contrast. Resizing
    and re-encoding a photo keep it within ~22 bits; other pictures differ by 56 or more (bench_check)."""
    from scipy.fft import dctn  # scipy comes with scikit-learn

    grey = np.asarray(img.convert("L").resize((32, 32), Image.BOX), dtype=np.float32)
    if grey.std() < 2.0:
        return "plain"
    low = dctn(grey, norm="ortho")[:16, :16].ravel()[1:]  # without the mean (DC) term
    return np.packbits(np.append(low > np.median(low), False)).tobytes().hex()


def inspect_file(path: str, size: int | None = None, max_bytes: int = MAX_BYTES, interpolation: str = "bilinear"
                 ) -> tuple[str | None, str, str, np.ndarray | None]:
    """(reason to skip or None, sha1 of the bytes, perceptual hash, the image as load_image(path, size)
    gives it when a size is asked for) for one file. The check has to decode the image anyway: for a
    big photo that is all the work of caching it."""
    try:
        data = read_file(path, max_bytes)
    except BadImage as e:
        return str(e), "", "", None
    digest = hashlib.sha1(data).hexdigest()
    if not data:
        return "empty file", digest, "", None
    try:
        img = to_rgb(open_image(data, draft=size or 64))
    except BadImage as e:
        return str(e), digest, "", None
    return None, digest, look_hash(img), square(img, size, interpolation) if size else None


Checked = dict[str, tuple[str | None, str, str]]
# Under torchrun, rank 0 hands its check to a sharer (engine.share_check): the paths to inspect, what the
# other machines need to fill their own caches on the way (fill_spec), how rank 0 inspects its share, and
# how it completes its cache once every result is in
Share = Callable[[list[str], dict[str, Any], Callable[[list[str]], Checked], Callable[[Checked], None]], Checked]


def check_files(paths: list[str], cache_dir: str | None = None, progress: bool = True,
                fill: ImageCache | CompactCache | None = None, max_bytes: int = MAX_BYTES,
                share: Share | None = None) -> dict[str, tuple[str | None, str, str]]:
    """(reason to skip or None, sha1, perceptual hash) per file, inspected in parallel; results are
    cached by files.identity() so re-checks are quick. "Too large" depends on `max_bytes`, not on the file:
    it is decided from the size each time, never remembered (a remembered verdict would outlive the limit).
    With `fill` (a cache of these paths), each image decoded by the check is also written to that
    cache, so a first run decodes every file once, not twice; the cache is complete on return.
    With `share`, each machine of a torchrun job inspects a share of the files (filling its own cache)."""
    if fill is not None and fill.ready:
        fill = None
    known = read_checks(cache_root(cache_dir) / "checks.json")
    results: dict[str, tuple] = {}
    todo = []
    for p in paths:
        _, *stamp = files.identity(p)
        if stamp[0] < 0:
            results[p] = ("missing", "", "")
            continue
        if stamp[0] > max_bytes:
            results[p] = (folders.too_large(stamp[0], max_bytes), "", "")
            continue
        entry = known.get(p)
        if isinstance(entry, list) and len(entry) == 6 and entry[:3] == stamp and not is_too_large(entry[3]):
            results[p] = tuple(entry[3:])
        else:
            todo.append((p, stamp))
    if todo:
        if fill is not None:
            fill.begin()
        try:
            here = functools.partial(inspect_all, fill=fill, max_bytes=max_bytes, progress=progress)
            todo_paths, remembered_bad = [p for p, _ in todo], [p for p, r in results.items() if r[0]]
            spec = fill_spec(fill, cache_dir, max_bytes, skip=remembered_bad)
            found = here(todo_paths) if share is None else share(
                todo_paths, spec, here, lambda found: finish_cache(fill, found, spec, progress))
        except BaseException:
            if fill is not None:
                fill.discard()
            raise
        for p, stamp in todo:
            results[p] = found[p]
            if not is_too_large(found[p][0]):  # (grown since it was stat'ed)
                known[p] = [*stamp, *found[p]]
        files.atomic_write_text(cache_root(cache_dir) / "checks.json",
                                json.dumps({"version": CHECK_VERSION, "files": known}))
    if fill is not None:  # images whose check was remembered from an earlier run are decoded now
        fill.build(progress, skip={p for p, result in results.items() if result[0]})
    return results


def is_too_large(reason: str | None) -> bool:
    """A verdict of the size limit in force, not of the file (folders.too_large)."""
    return bool(reason) and reason.startswith(folders.TOO_LARGE)


def inspect_all(paths: list[str], fill: ImageCache | CompactCache | None, max_bytes: int, progress: bool = True
                ) -> Checked:
    """inspect_file for each path, on every core (PIL decodes without the GIL); with `fill` (begun), each
    decoded image is also put into that cache."""
    def inspect(path: str) -> tuple[str | None, str, str]:
        reason, digest, look, pixels = inspect_file(path, fill and fill.size, max_bytes,
                                                    fill.interpolation if fill else "bilinear")
        if fill is not None:
            fill.put(path, pixels)
        return reason, digest, look

    desc = f"checking and caching images ({fill.size}px)" if fill else "checking images"
    found = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for path, result in tqdm(zip(paths, pool.map(inspect, paths)), total=len(paths), desc=desc,
                                 disable=None if progress and paths else True, leave=False):
            found[path] = result
    return found


def fill_spec(fill: ImageCache | CompactCache | None, cache_dir: str | None, max_bytes: int, skip: list[str]
              ) -> dict[str, Any]:
    """What another machine needs to check a share of the files as this one does, filling its own cache of
    the same files (in its own cache folder: its local disk, unless --cache-dir is shared)."""
    cache = None if fill is None else {"kind": "compact" if isinstance(fill, CompactCache) else "raw",
                                       "paths": fill.paths, "size": fill.size, "interpolation": fill.interpolation}
    return {"cache": cache, "cache_dir": cache_dir, "max_bytes": max_bytes, "skip": skip}


def check_share(paths: list[str], spec: dict[str, Any]) -> tuple[dict[str, tuple], ImageCache | CompactCache | None]:
    """This machine's share of another process's check (fill_spec): the results, and this machine's cache
    of the files, begun and holding the share's images (finish_cache completes it)."""
    c = spec["cache"]
    fill = None if c is None else make_cache(c["kind"], c["paths"], c["size"], spec["cache_dir"], spec["max_bytes"],
                                             c["interpolation"])
    if fill is not None and fill.ready:
        fill = None
    if fill is not None:
        fill.begin()
    try:
        return inspect_all(paths, fill, spec["max_bytes"], progress=False), fill
    except BaseException:
        if fill is not None:
            fill.discard()
        raise


def finish_cache(fill: ImageCache | CompactCache | None, results: Checked, spec: dict[str, Any],
                 progress: bool = False) -> None:
    """Decode the images the other machines checked into this machine's cache, and publish it."""
    if fill is not None:
        fill.build(progress, skip={p for p, r in results.items() if r[0]} | set(spec["skip"]))


def read_checks(store: Path) -> dict[str, list]:
    """Remembered checks; anything unexpected in the file (another version, damage) means none."""
    try:
        cached = json.loads(store.read_text()) if files.is_regular(store) else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict) or cached.get("version") != CHECK_VERSION:
        return {}
    known = cached.get("files")
    return known if isinstance(known, dict) else {}


# ----------------------------------------------------------------------------- folders and splits

def list_files(folder: Path) -> list[str]:
    """Every file below `folder` that the folder rules let through (folders.py), sorted."""
    return folders.Walk().image_files(Path(folder))


def class_folders(folder: Path) -> list[str]:
    return [d.name for d in folders.Walk().subfolders(Path(folder))]


@dataclass
class DataSplit:
    """What a run trains and validates on: written to the run folder as split.json."""
    root: str
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # checked and unreadable: (path, reason)
    leaks: list[tuple[str, str, int]] = field(default_factory=list)  # (train, val or test, hash distance)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # never opened: (path, reason), folders.py
    ignored: list[str] = field(default_factory=list)  # folders ignored by name
    repeats: list[tuple[str, str, int]] = field(default_factory=list)  # look-alikes within a class
    test: list[tuple[str, int]] = field(default_factory=list)  # held out from training and model selection
    multilabel: bool = False  # a label file's `labels` column: each item's label is a tuple of label indices
    # `test` was set aside from the checked files (--test-split), so the check put it into the image cache too
    # (False in split.json files of older runs, whose cache left it out)
    test_cached: bool = False

    def save(self, path: Path) -> None:
        files.atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> DataSplit:
        d = json.loads(Path(path).read_text())
        for key in ("train", "val", "skipped", "leaks", "left_out", "repeats", "test"):
            d[key] = [tuple(x) for x in d.get(key, [])]
        if d.get("multilabel"):
            for key in ("train", "val", "test"):
                d[key] = [(p, tuple(y)) for p, y in d[key]]
        return cls(**d)

    def files(self) -> list[str]:
        """Every file that was checked, in the order the image cache stores them: the cache the check
        filled is the one training reads (one decode of each image, one cache)."""
        return sorted([p for p, _ in self.train + self.val + (self.test if self.test_cached else [])] +
                      [p for p, _ in self.skipped])

    def counts(self, items: list[tuple[str, Any]]) -> list[int]:
        """Images per class (per label: the images that have it)."""
        return class_counts(items, len(self.classes))

    def not_used(self) -> list[tuple[str, str]]:
        """Every file of the data set that is not trained or validated on, with the reason."""
        return self.left_out + self.skipped


def resolve_data_dir(data: str) -> Path:
    """'demo' or a folder; a missing or empty folder is the user's mistake, said in one line."""
    if data == "demo":
        return export_demo()
    root = Path(os.path.abspath(os.path.expanduser(data)))  # split.json's paths then hold from any directory
    if not root.is_dir():
        raise UsageError(f"data folder {data} does not exist: give --data DIR with one sub-folder per class, "
                         "or --data demo")
    return root


def labelled(walk: folders.Walk, folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    return [(p, i) for i, c in enumerate(classes) for p in walk.image_files(folder / c)]


def check_folds(items: list[tuple[str, int]], classes: list[str], folds: int, say: bool = True) -> None:
    """Every fold validates on something; a class smaller than the folds is said (some folds will not
    validate on it, and a class of one image is missing from one fold's training), with `say`: by the
    job's first fold, not again by each."""
    counts = class_counts(items, len(classes))
    if len(items) < folds:
        raise UsageError(f"--folds {folds}: only {len(items)} images to share out (after the test split): use "
                         f"--folds {max(2, len(items))} or fewer")
    small = [f"{shown(c)} ({counts[i]})" for i, c in enumerate(classes) if counts[i] < folds]
    if small and say:
        warn(f"class(es) with fewer images than the {folds} folds: {', '.join(small)}; some folds validate "
             "without them, and their per-class scores cover only the folds that had them")


def prepare_data(data: str, val_split: float = 0.2, seed: int = 42, cache_dir: str | None = None,
                 progress: bool = True, cache_size: int | None = None,
                 max_file_mb: float = folders.DEFAULT_MAX_FILE_MB, test_split: float = 0.0,
                 folds: int = 0, fold: int = 0, label_sep: str = labels.DEFAULT_SEP, image_cache: str = "raw",
                 interpolation: str = "bilinear", share: Share | None = None) -> DataSplit:
    """Find classes and files (a folder, or a label file), check them all, split, look for look-alikes
    across the splits; every problem a person can fix is a UsageError. With `test_split`, a stratified
    share is set aside as the run's own test set (DataSplit.test). With `folds`, the rest is cut into
    that many stratified folds and fold number `fold` validates. With `cache_size`, also fill the
    decoded-image cache of DataSplit.files() at that size (resized with `interpolation`). With `share`
    (under torchrun), the machines check a share of the files each (check_files)."""
    walk = folders.Walk(max_bytes=int(max_file_mb * 2**20))
    train_dir = None  # a folder's training folder: another path to a training image in it is no leak
    if labels.is_label_file(data):
        root, classes, sets, own_split = label_file_sets(data, label_sep)
    else:
        root = resolve_data_dir(data)
        classes, sets, own_split, train_dir = folder_sets(root, walk)
    if test_split and own_split:
        raise UsageError(f"--test-split sets aside part of a flat folder or of a label file without a split column; "
                         f"{shown(root)} has its own split ({own_split}): drop --test-split")
    paths = sorted(p for name in ("train", "val") for p, _ in sets[name])
    cache = make_cache(image_cache, paths, cache_size, cache_dir, walk.max_bytes, interpolation) if cache_size \
        else None
    checked = check_files(paths, cache_dir, progress, fill=cache, max_bytes=walk.max_bytes, share=share)
    checked.update(check_files([p for p, _ in sets["test"]], cache_dir, progress, max_bytes=walk.max_bytes,
                               share=share)
                   if sets["test"] else {})
    skipped = [(p, checked[p][0]) for name in ("train", "val") for p, _ in sets[name] if checked[p][0]]
    good = {name: [(p, y) for p, y in items if not checked[p][0]] for name, items in sets.items()}
    counts = class_counts(good["train"] + (good["val"] if folds else []), len(classes))
    empty = [shown(c) for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        raise UsageError(f"class(es) {', '.join(empty)} of {shown(root)} have no readable training images: add "
                         "images or remove the class")
    train, val = good["train"], good["val"]
    # the run's own test set: a label file's test rows, or --test-split's share. A test/ folder's classes
    # may differ from training's: eval.py reads it itself; here it only takes part in the leak check.
    test, outside = (good["test"], []) if labels.is_label_file(data) else ([], good["test"])
    if test_split:
        train, test = stratified_split(train, test_split, derived_seed(seed, 1))
    if folds:
        check_folds(train + val, classes, folds, say=fold == 1)
        train, val = fold_split(train + val, folds, fold, seed)
    elif not sets["val"]:
        train, val = stratified_split(train, val_split / (1 - test_split), seed)
    if not val:
        raise UsageError(f"no validation images from {shown(root)}: " + (
            "its validation images cannot be read (see python dataset.py check)" if sets["val"] else
            "too few readable images to hold any out; add images"))
    looks = {p: "sha1:" + checked[p][1] if checked[p][2] == "plain" else checked[p][2] for p in checked
             if checked[p][2]}
    held = val + test + outside
    leaks = (lookalikes([p for p, _ in train], [p for p, _ in held], looks) +
             lookalikes([p for p, _ in val], [p for p, _ in test + outside], looks) +
             linked_across(walk.aliases, [p for p, _ in train], [p for p, _ in held], train_dir))
    many = splits.is_multilabel(sets["train"])
    within = [[p for p, _ in items] for items in (train, val)] if many else \
        [[p for p, y in items if y == c] for items in (train, val) for c in range(len(classes))]
    repeats = [pair for group in within for pair in lookalikes(group, None, looks)]
    return DataSplit(str(root), classes, train, val, skipped, leaks, walk.skipped, walk.ignored, repeats, test,
                     many, test_cached=bool(test_split))


def folder_sets(root: Path, walk: folders.Walk) -> tuple[list[str], dict[str, list[tuple[str, int]]], str, Path]:
    """(classes, the train/val/test items of a folder, its own split folders or "", and its training folder:
    the data set's root when it is split by --val-split)."""
    train_dir, val_dir, test_dir = folders.find_layout(root, walk)
    classes = [d.name for d in walk.subfolders(train_dir)]
    if not classes:
        raise UsageError(f"no class folders in {shown(train_dir)}: expected {shown(train_dir)}/<class name>/<images>")
    if len(classes) < 2:
        raise UsageError(f"only one class ({shown(classes[0])}) in {shown(train_dir)}: a classifier needs at least "
                         "two class folders")
    if val_dir is not None:
        val_classes = [d.name for d in walk.subfolders(val_dir)]
        if val_classes != classes:
            only_train = sorted(map(shown, set(classes) - set(val_classes)))
            only_val = sorted(map(shown, set(val_classes) - set(classes)))
            raise UsageError(f"train and {val_dir.name} classes differ (only in train: {only_train or '-'}; "
                             f"only in {val_dir.name}: {only_val or '-'}): make the class folders match")
    test_classes = [d.name for d in walk.subfolders(test_dir)] if test_dir else []
    claim_structure(walk, root, [(d, classes if d is not test_dir else test_classes)
                                 for d in (train_dir, val_dir, test_dir) if d is not None])
    sets = {"train": labelled(walk, train_dir, classes),
            "val": labelled(walk, val_dir, classes) if val_dir else [],
            "test": labelled(walk, test_dir, test_classes) if test_dir else []}
    own = " and ".join(f"{d.name}/" for d in (val_dir, test_dir) if d is not None)
    return classes, sets, own, train_dir


def label_file_sets(data: str, sep: str = labels.DEFAULT_SEP
                    ) -> tuple[Path, list[str], dict[str, list[tuple[str, Any]]], str]:
    """(the label file, its classes, its train/val/test rows, "a split column" or "")."""
    lf = labels.check_trainable(labels.read(data, sep))
    if not lf.split:
        return lf.source, lf.classes, {"train": lf.items, "val": [], "test": []}, ""
    return lf.source, lf.classes, {name: lf.rows(name) for name in labels.SPLITS}, "a split column"


def claim_structure(walk: folders.Walk, root: Path, parts: list[tuple[Path, list[str]]]) -> None:
    """The root, split and class folders are the data set's own: claimed before any is walked, so a
    link to one of them from elsewhere adds nothing; two class folders that are one folder are refused."""
    walk.claim(root)
    for split_dir, names in parts:
        walk.claim(split_dir)
        for name in names:
            first = walk.claim(split_dir / name)
            if first != str(split_dir / name):
                raise UsageError(f"class folders {shown(first)} and {shown(split_dir / name)} are the same folder "
                                 "(one is a link to the other): remove one")


def linked_across(aliases: list[tuple[str, str]], train: list[str], held_out: list[str],
                  train_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """Links and hard links between a training image and a held-out path (one in val/ or test/, skipped as
    the same file): the same picture (leakage). Another path to it inside the training folder is not."""
    train_set, held = set(train), set(held_out)
    inside = str(train_dir).rstrip(os.sep) + os.sep if train_dir is not None else None
    out = []
    for a, b in aliases:
        if a in train_set and b not in train_set and (inside is None or not b.startswith(inside)):
            out.append((a, b, 0))
        elif b in train_set and a in held:
            out.append((b, a, 0))
    return out


LOOKALIKE_BITS = 22  # of 256: measured in bench_check: re-encoded copies up to 22 bits, other photos 56 or more


def lookalikes(a: list[str], b: list[str] | None, looks: dict[str, str], max_bits: int = LOOKALIKE_BITS
               ) -> list[tuple[str, str, int]]:
    """Pairs (x from a, y from b; or x, y both from a when b is None) that are the same picture: exact
    copies, and (by perceptual hash, at most `max_bits` apart) the same photo resized or re-encoded.
    `looks` maps a path to its perceptual hash, or to "sha1:<digest>" for a plain picture (pictures
    with no contrast all hash alike, so they are compared by their bytes only). Blocked
    all-pairs with bit counting, so 50,000 images take seconds."""
    out = []
    exact: dict[str, list[str]] = defaultdict(list)
    for p in (a if b is None else b):
        if looks.get(p, "").startswith("sha1:"):
            exact[looks[p]].append(p)
    for p in a:
        for q in exact.get(looks.get(p, ""), []):
            if b is not None or p < q:
                out.append((p, q, 0))
    a = [p for p in a if p in looks and not looks[p].startswith("sha1:")]
    b = a if b is None else [p for p in b if p in looks and not looks[p].startswith("sha1:")]
    if not a or not b:
        return out
    ha, hb = (np.frombuffer(bytes.fromhex("".join(looks[p] for p in ps)), dtype=np.uint64).reshape(len(ps), -1)
              for ps in (a, b))
    rows = max(1, 2**22 // (len(b) * ha.shape[1]))
    for i in range(0, len(a), rows):
        dist = np.bitwise_count(ha[i:i + rows, None, :] ^ hb[None, :, :]).sum(-1, dtype=np.int32)
        for x, y in zip(*np.nonzero(dist <= max_bits)):
            if b is not a or i + x < y:  # within one list: each pair once, never an image with itself
                out.append((a[i + x], b[y], int(dist[x, y])))
    return out


Scanned = tuple[list[str], list[tuple[str, int]], list[tuple[str, str]], "ImageCache | None", str]


def scan_folder(folder: Path, cache_dir: str | None = None, progress: bool = True, cache_size: int | None = None,
                max_bytes: int = MAX_BYTES, interpolation: str = "bilinear", image_cache: str = "raw") -> Scanned:
    """An evaluation folder: (classes, good (path, label) items, skipped (path, reason), with `cache_size`
    the decoded-image cache the check filled, and which images they are). A data set root gives its
    test/ (else val/)."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: give a folder with one sub-folder per class")
    walk = folders.Walk(max_bytes=max_bytes)
    root = folder
    train_dir, val_dir, test_dir = folders.find_layout(folder, walk)
    if train_dir != folder:  # a dataset root: evaluate its held-out part
        folder = test_dir or val_dir
        if folder is None:
            raise UsageError(f"{shown(train_dir.parent)} has train/ but no test/ or val/ folder to evaluate: give "
                             "the folder of images to evaluate")
    classes = [d.name for d in walk.subfolders(folder)]
    claim_structure(walk, root, [(folder, classes)])
    items = labelled(walk, folder, classes)
    if walk.ignored:
        print(folders.ignored_line(walk.ignored))
    good, skipped, cache = check_items(items, f"{shown(folder)}/<class>/", cache_dir, progress, cache_size, max_bytes,
                                       interpolation, image_cache)
    return classes, good, walk.skipped + skipped, cache, f"the images in {shown(folder)}"


def scan_labels(source: Path, cache_dir: str | None = None, progress: bool = True, cache_size: int | None = None,
                max_bytes: int = MAX_BYTES, sep: str = labels.DEFAULT_SEP, interpolation: str = "bilinear",
                image_cache: str = "raw") -> Scanned:
    """A label file to evaluate: its test rows, else its val rows (with a split column), else every row."""
    lf = labels.read(source, sep)
    part = next((name for name in ("test", "val") if lf.rows(name)), None)
    items = lf.rows(part) if part else lf.items
    good, skipped, cache = check_items(items, shown(lf.source), cache_dir, progress, cache_size, max_bytes,
                                       interpolation, image_cache)
    what = f"the {part} rows of {shown(lf.source)}" if part else f"the images listed in {shown(lf.source)}"
    return lf.classes, good, skipped, cache, what


def check_items(items: list[tuple[str, int]], where: str, cache_dir: str | None, progress: bool,
                cache_size: int | None, max_bytes: int, interpolation: str = "bilinear", image_cache: str = "raw"
                ) -> tuple[list[tuple[str, int]], list[tuple[str, str]], ImageCache | CompactCache | None]:
    """(readable items, skipped (path, reason), the cache the check filled, of the kind `image_cache` says:
    raw, compact, auto or none): every file checked once."""
    paths = sorted(p for p, _ in items)
    cache = make_cache(image_cache, paths, cache_size, cache_dir, max_bytes, interpolation) if cache_size else None
    if image_cache == "auto" and isinstance(cache, CompactCache):
        print(cache_chosen("compact", image_cache))
    checked = check_files([p for p, _ in items], cache_dir, progress, fill=cache, max_bytes=max_bytes)
    good = [(p, y) for p, y in items if not checked[p][0]]
    if not good:
        raise UsageError(f"no readable images in {where}: nothing to evaluate")
    return good, [(p, checked[p][0]) for p, _ in items if checked[p][0]], cache


def export_demo(dest: Path = DEMO_DIR) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) as 32 px PNG folders:
    train/<digit>/ for training (split into train and val) and every fifth image in test/<digit>/
    for eval.py and test.py, so the demo has data the model has never seen."""
    if (dest / "test" / "9").is_dir():
        return dest
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        img = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L").resize((32, 32), Image.BICUBIC)
        folder = tmp / ("test" if i % 5 == 4 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)  # atomic: a concurrent export either wins or finds the folder done
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------- datasets and caches

class ImageCache:
    """Every image of a list decoded and resized once into a uint8 .npy file, memory-mapped.

    The key covers each file's identity (path, size, mtime, ctime), the pixel size and the decoder's
    version, so a changed file or preprocessing builds a new cache instead of reading a stale one.
    Files found in the cache folder are checked (regular file, shape, dtype) before they are used;
    a bad one is rebuilt, never trusted.
    """

    def __init__(self, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = MAX_BYTES,
                 interpolation: str = "bilinear"):
        self.max_bytes, self.interpolation = max_bytes, interpolation
        stats = [files.identity(p) for p in paths]
        key = hashlib.sha1(json.dumps([CACHE_VERSION, size, stats, *resized_with(interpolation)]).encode()
                           ).hexdigest()[:20]
        folder = cache_root(cache_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{key}-{size}px.npy"
        self.ok_path = folder / f"{key}-{size}px.ok.npy"
        self.paths, self.size = paths, size
        self.row = {p: i for i, p in enumerate(paths)}
        self._pixels: np.ndarray | None = None
        self._ok: np.ndarray | None = None
        self._done: np.ndarray | None = None  # rows already decoded while building
        self._temp: tuple | None = None  # (file, path) of the pixels being built

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.paths), self.size, self.size, 3

    @property
    def ready(self) -> bool:
        """Both files published and sound; a damaged or foreign pair is removed so it is rebuilt."""
        if not (files.is_regular(self.path) and files.is_regular(self.ok_path)):
            return False
        try:
            pixels = np.load(self.path, mmap_mode="r")
            ok = np.load(self.ok_path, mmap_mode="r")
            sound = (pixels.shape == self.shape and pixels.dtype == np.uint8 and ok.shape == (len(self.paths),)
                     and ok.dtype == np.bool_)
        except (OSError, ValueError, EOFError):
            sound = False
        if not sound:
            warn(f"rebuilding a damaged image cache ({self.path.name})")
            self.path.unlink(missing_ok=True)
            self.ok_path.unlink(missing_ok=True)
        return sound

    def begin(self) -> None:
        """Open the temporary files that put() and build() fill (before any threads use it)."""
        if self._done is not None:
            return
        files.remove_stale_temps(self.path.parent)
        f, _ = self._temp = files.open_temp(self.path)
        # the .npy header, then the pixels memory-mapped through our own descriptor: nothing is
        # opened by name, so a link planted in the cache folder is never written through
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": self.shape})
        offset = f.tell()
        f.truncate(offset + int(np.prod(self.shape)))
        try:  # the space reserved now: a full disk is an error here, not a SIGBUS while writing the map
            os.posix_fallocate(f.fileno(), 0, offset + int(np.prod(self.shape)))
        except OSError as e:
            error = compact_cache.no_space(self.path, e, int(np.prod(self.shape)))
            if isinstance(error, UsageError):
                files.discard(*self._temp)
                self._temp = None
                raise error from None  # (a file system that cannot reserve space: written as it goes)
        self._pixels = np.memmap(f, dtype=np.uint8, mode="r+", offset=offset, shape=self.shape)
        self._ok = np.zeros(len(self.paths), dtype=bool)
        self._done = np.zeros(len(self.paths), dtype=bool)

    def put(self, path: str, pixels: np.ndarray | None) -> None:
        """One image decoded elsewhere (by the file check); None marks it unreadable."""
        i = self.row[path]
        if pixels is not None:
            self._pixels[i] = pixels
        self._ok[i], self._done[i] = pixels is not None, True

    def build(self, progress: bool = True, skip: set[str] = frozenset()) -> None:
        """Decode what put() has not given (except `skip`: files known to be unreadable) and publish."""
        if self.ready:  # another process finished first: ours is not needed
            self.discard()
            return
        self.begin()
        todo = [i for i, p in enumerate(self.paths) if not self._done[i] and p not in skip]

        def decode(i: int) -> None:
            try:
                self._pixels[i] = load_image(self.paths[i], self.size, self.max_bytes, self.interpolation)
                self._ok[i] = True
            except (BadImage, OSError) as e:
                warn(f"skipped {self.paths[i]}: {e}")

        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(tqdm(pool.map(decode, todo), total=len(todo), desc=f"caching images ({self.size}px)",
                          disable=None if progress and todo else True, leave=False))
            self._pixels.flush()
            # the flags first, then the pixels: `ready` needs both, so no reader sees half a cache
            files.atomic_write(self.ok_path, lambda f: np.save(f, self._ok))
            self._pixels = None
            files.publish(*self._temp, self.path)
            self._temp = None
        finally:
            self.discard()  # after publishing, get() maps the published file

    def discard(self) -> None:
        """Drop an unfinished build (Ctrl-C, an error, a race lost) and its temporary file."""
        if self._temp is not None:
            self._pixels = None
            files.discard(*self._temp)
            self._temp = None
        if self._done is not None:
            self._pixels = self._ok = self._done = None

    def get(self, path: str) -> np.ndarray | None:
        if self._pixels is None:  # opened lazily so DataLoader workers each map the file themselves
            self._pixels = np.load(self.path, mmap_mode="r")
            self._ok = np.load(self.ok_path)
        i = self.row[path]
        return np.array(self._pixels[i]) if self._ok[i] else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None, "_ok": None, "_done": None, "_temp": None}


RAW_SHARE_OF_FREE_DISK = 0.5  # auto: the raw cache while it takes at most this share of the free space


def resized_with(interpolation: str) -> list[str]:
    """The interpolation, for cache keys: said only when not bilinear, so caches built before stay valid."""
    return [] if interpolation == "bilinear" else [interpolation]


def cache_kind(kind: str, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = MAX_BYTES,
               interpolation: str = "bilinear") -> str:
    """raw, compact or none: auto is the cache of these files already built, else raw while it fits in
    half the free space of the cache's disk, else compact."""
    if kind != "auto":
        return kind
    import shutil

    for built in ("raw", "compact"):
        if make_cache(built, paths, size, cache_dir, max_bytes, interpolation).ready:
            return built
    free = shutil.disk_usage(cache_root(cache_dir)).free
    return "raw" if len(paths) * size * size * 3 <= RAW_SHARE_OF_FREE_DISK * free else "compact"


def cache_chosen(kind: str, asked: str) -> str:
    """The cache a run or an evaluation uses, said once (and why, when auto chose the compact one)."""
    return f"image cache: {kind}" + (" (auto: the raw cache would not fit in half the free disk, or a compact one "
                                     "of these images was already built)" if asked == "auto" and kind == "compact"
                                     else "")


def make_cache(kind: str, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = MAX_BYTES,
               interpolation: str = "bilinear") -> ImageCache | CompactCache | None:
    """The decoded-image cache of `paths` of the kind asked for (auto resolved by cache_kind)."""
    kind = cache_kind(kind, paths, size, cache_dir, max_bytes, interpolation)
    if kind == "compact":
        load = functools.partial(load_or_none, size=size, max_bytes=max_bytes, interpolation=interpolation)
        decoder = [CACHE_VERSION, interpolation] if resized_with(interpolation) else CACHE_VERSION  # (keys as before)
        return CompactCache(paths, size, load, decoder, cache_dir, interpolation)
    return ImageCache(paths, size, cache_dir, max_bytes, interpolation) if kind == "raw" else None


def load_or_none(path: str, size: int, max_bytes: int, interpolation: str = "bilinear") -> np.ndarray | None:
    """load_image, or None (with a warning) for a file that cannot be read now."""
    try:
        return load_image(path, size, max_bytes, interpolation)
    except (BadImage, OSError) as e:
        warn(f"skipped {path}: {e}")
        return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class ImageDataset(Dataset):
    """(uint8 CHW tensor, label, index) per image; an unreadable image gives None, never an exception.

    Keyed by an index, or by (index, epoch[, draw]) as ResumableSampler yields: then the augmentation of
    that draw of the image in that epoch is seeded from (seed, epoch, index[, draw]), the same in any worker
    process and after any resume. An image's first draw keeps the seed it had before draws were counted.
    """

    def __init__(self, items: list[tuple[str, Any]], size: int, transform: Callable | None = None,
                 cache: ImageCache | None = None, seed: int = 0, max_bytes: int = MAX_BYTES,
                 num_classes: int | None = None, interpolation: str = "bilinear"):
        self.paths = [p for p, _ in items]
        self.labels = targets(items, num_classes)
        self.size, self.transform, self.cache, self.seed, self.max_bytes = size, transform, cache, seed, max_bytes
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int, int] | None:
        i, epoch, draw = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        if self.cache is not None:
            arr = self.cache.get(self.paths[i])
            if arr is None:
                return None
        else:
            try:
                arr = load_image(self.paths[i], self.size, self.max_bytes, self.interpolation)
            except (BadImage, OSError) as e:  # changed or deleted since the check: skip, go on
                warn(f"skipped {self.paths[i]}: {e}")
                return None
        x = torch.from_numpy(arr).permute(2, 0, 1)
        if self.transform is not None:
            if epoch is None:
                x = self.transform(x)
            else:
                transform = self.transform.at(epoch) if isinstance(self.transform, BySize) else self.transform
                with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                    torch.manual_seed(derived_seed(self.seed, epoch, i, draw) if draw else
                                      derived_seed(self.seed, epoch, i))  # a first draw: the seed it always had
                    x = transform(x)
        return x, self.labels[i], i


def targets(items: list[tuple[str, Any]], num_classes: int | None) -> list:
    """What the loss compares with, per item: its class index, or a multi-label item's multi-hot vector."""
    if not splits.is_multilabel(items):
        return [y for _, y in items]
    if num_classes is None:
        raise ValueError("multi-label items need num_classes")  # a bug
    return [multilabel.multi_hot(y, num_classes) for _, y in items]


def collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; also say how many in the batch could not be read."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), len(batch)
    xs, ys, idx = zip(*good)
    y = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.as_tensor(ys)
    return torch.stack(xs), y, torch.as_tensor(idx), len(batch) - len(good)


def train_transform(img_size: int, augment: str = "basic", min_scale: float = 0.35,
                    hflip: float = 0.5) -> Callable:
    """Augmentation on uint8 tensors (cheap, and the same for cached and uncached images)."""
    from torchvision.transforms import v2

    if augment == "none":
        return v2.CenterCrop(img_size)
    steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if augment == "randaugment":
        steps.append(v2.RandAugment())
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)


class BySize:
    """Training crops whose size depends on the epoch (progressive resizing: small crops first, cheaper,
    then --img-size): the dataset asks for the epoch's transform, so every worker process and every resume
    takes the same size for an epoch."""

    def __init__(self, size_of: Callable[[int], int], make: Callable[[int], Callable]):
        self.size_of, self.make, self.made = size_of, make, {}

    def at(self, epoch: int) -> Callable:
        size = self.size_of(epoch)
        if size not in self.made:
            self.made[size] = self.make(size)
        return self.made[size]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # without an epoch: the final size
        return self.at(sys.maxsize)(x)


def eval_transform(img_size: int) -> Callable:
    from torchvision.transforms import v2

    return v2.CenterCrop(img_size)


# ----------------------------------------------------------------------------- the check command

def report(split: DataSplit, out: Callable[[str], None] = print, listing: Path | None = None) -> None:
    """Per-class counts, imbalance, what is ignored and skipped and why, and look-alikes, for people (all
    the look-alike pairs in the CSV `listing` when there are more than the screen shows)."""
    train_counts, val_counts, test_counts = split.counts(split.train), split.counts(split.val), split.counts(split.test)
    names = [shown(c) for c in split.classes]
    width = max(len(c) for c in names)
    test = f" + {len(split.test)} test (held out)" if split.test else ""
    out(f"{len(names)} classes, {len(split.train)} train + {len(split.val)} val{test} images in {shown(split.root)}")
    for name, nt, nv, ne in zip(names, train_counts, val_counts, test_counts):
        out(f"  {name:>{width}}  train {nt:6d}  val {nv:6d}" + (f"  test {ne:6d}" if split.test else ""))
    report_findings(split, [a + b + c for a, b, c in zip(train_counts, val_counts, test_counts)], split.leaks,
                    f"{len({b for _, b, _ in split.leaks})} image(s) in val/test look like train images", split.repeats,
                    out, listing)


def report_folds(splits: list[DataSplit], out: Callable[[str], None] = print, listing: Path | None = None) -> None:
    """report() for k-fold cross-validation, from each fold's DataSplit as its run gets it: the images
    each fold validates on per class, and look-alikes that fall in two folds (or one in the test set),
    since the run of either fold trains on one and validates on the other."""
    first, k = splits[0], len(splits)
    names = [shown(c) for c in first.classes]
    width = max(len(c) for c in [*names, "class"])
    per_fold = [split.counts(split.val) for split in splits]
    test_counts = first.counts(first.test)
    test = f" + {len(first.test)} test (held out)" if first.test else ""
    out(f"{len(names)} classes, {len(first.train) + len(first.val)} images in {k} folds{test} in {shown(first.root)}; "
        "each fold's run validates on its fold and trains on the others")
    out(f"  {'class':>{width}}" + "".join(f"  {f'fold {f}':>7}" for f in range(1, k + 1)) +
        (f"  {'test':>7}" if first.test else ""))
    for c, name in enumerate(names):
        out(f"  {name:>{width}}" + "".join(f"  {counts[c]:7d}" for counts in per_fold) +
            (f"  {test_counts[c]:7d}" if first.test else ""))
    leaks: dict[frozenset, tuple[str, str, int]] = {}
    for split in splits:
        for leak in split.leaks:
            leaks.setdefault(frozenset(leak[:2]), leak)
    repeats = [pair for pair in first.repeats if frozenset(pair[:2]) not in leaks]  # within a fold
    report_findings(first, [sum(col) + t for col, t in zip(zip(*per_fold), test_counts)], list(leaks.values()),
                    f"{len({p for pair in leaks for p in pair})} image(s) look like an image of another fold or of the "
                    "test set", repeats, out, listing, "like an image of another fold or of the test set")


SHOWN_LEAKS, SHOWN_REPEATS = 20, 10  # look-alike pairs on the screen; the rest in a file


def lookalikes_file(root: str, cache_dir: str | None = None) -> Path:
    """Where `dataset.py check` lists every look-alike pair of a data set: the cache folder (never the data)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(root).name)[:40] or "data"
    digest = hashlib.sha1(os.fsencode(root)).hexdigest()[:10]
    return cache_root(cache_dir) / "checks" / f"look-alikes-{name}-{digest}.csv"


def write_lookalikes(path: Path, leaks: list[tuple[str, str, int]], leak_kind: str,
                     repeats: list[tuple[str, str, int]]) -> None:
    """Every look-alike pair: kind, the image, the one it looks like, the hash distance (0: the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_csv(path, ["kind", "image", "looks_like", "distance"],
                    [[kind, b, a, d] for pairs, kind in ((leaks, leak_kind), (repeats, "within a class"))
                     for a, b, d in pairs])


def report_findings(split: DataSplit, totals: list[int], leaks: list[tuple[str, str, int]], leaked: str,
                    repeats: list[tuple[str, str, int]], out: Callable[[str], None], listing: Path | None = None,
                    leak_kind: str = "like a training image") -> None:
    out(f"imbalance (largest/smallest class): {max(totals) / max(1, min(totals)):.1f}x")
    if split.ignored:
        out(f"ignored {len(split.ignored)} folder(s) by name (system clutter, see README):")
        for path in split.ignored:
            out(f"  {shown(path)}")
    if split.not_used():
        out(f"skipping {len(split.not_used())} file(s):")
        for path, reason in split.not_used():
            out(f"  {folders.listed(path)}: {reason}")
    if leaks:
        out(f"warning: {leaked} (leakage; {len(leaks)} pair(s), perceptual hash distance in bits of 256, 0 = the "
            "same picture):")
        for a, b, d in leaks[:SHOWN_LEAKS]:
            out(f"  {shown(b)} ~ {shown(a)} ({d})")
    truncated = len(leaks) > SHOWN_LEAKS or len(repeats) > SHOWN_REPEATS
    if truncated and listing is not None:
        write_lookalikes(listing, leaks, leak_kind, repeats)
    where = f"; all {len(leaks) + len(repeats)} pairs in {shown(listing)}" if truncated and listing else ""
    if len(leaks) > SHOWN_LEAKS:
        out(f"  ... and {len(leaks) - SHOWN_LEAKS} more{where}")
    if repeats:
        out(f"hint: {len(repeats)} pair(s) of images within a class look alike (duplicates weigh twice):")
        for a, b, d in repeats[:SHOWN_REPEATS]:
            out(f"  {shown(b)} ~ {shown(a)} ({d})")
        if len(repeats) > SHOWN_REPEATS:
            out(f"  ... and {len(repeats) - SHOWN_REPEATS} more{where}")
