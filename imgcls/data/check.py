"""The file check: every file decoded once, the results cached by file identity, look-alikes found; shared under
torchrun."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from imgcls import files
from imgcls.data import folders, imagecache, images, labelfile
from imgcls.data.compactcache import CompactCache
from imgcls.data.folders import shown
from imgcls.data.imagecache import ImageCache
from imgcls.errors import UsageError
from imgcls.settings import cache_root

CHECK_VERSION = 5  # 2: keyed by ctime too; 3: perceptual hashes, EXIF orientation; 4: pHash; 5: 16-bit mode I


def inspect_file(path: str, size: int | None = None, max_bytes: int = images.MAX_BYTES, interpolation: str = "bilinear"
                 ) -> tuple[str | None, str, str, np.ndarray | None]:
    """(reason to skip or None, sha1 of the bytes, perceptual hash, the image as load_image(path, size)
    gives it when a size is asked for) for one file. The check has to decode the image anyway: for a
    big photo that is all the work of caching it."""
    try:
        data = images.read_file(path, max_bytes)
    except images.BadImage as e:
        return str(e), "", "", None
    digest = hashlib.sha1(data).hexdigest()
    if not data:
        return "empty file", digest, "", None
    try:
        img = images.to_rgb(images.open_image(data, draft=size or 64))
    except images.BadImage as e:
        return str(e), digest, "", None
    return None, digest, images.look_hash(img), images.square(img, size, interpolation) if size else None


Checked = dict[str, tuple[str | None, str, str]]


# Under torchrun, rank 0 hands its check to a sharer (engine.share_check): the paths to inspect, what the
# other machines need to fill their own caches on the way (fill_spec), how rank 0 inspects its share, and
# how it completes its cache once every result is in
Share = Callable[[list[str], dict[str, Any], Callable[[list[str]], Checked], Callable[[Checked], None]], Checked]


def check_files(paths: list[str], cache_dir: str | None = None, progress: bool = True,
                fill: imagecache.ImageCache | CompactCache | None = None, max_bytes: int = images.MAX_BYTES,
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


def inspect_all(paths: list[str], fill: imagecache.ImageCache | CompactCache | None, max_bytes: int,
                progress: bool = True
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


def fill_spec(fill: imagecache.ImageCache | CompactCache | None, cache_dir: str | None, max_bytes: int, skip: list[str]
              ) -> dict[str, Any]:
    """What another machine needs to check a share of the files as this one does, filling its own cache of
    the same files (in its own cache folder: its local disk, unless --cache-dir is shared)."""
    cache = None if fill is None else {"kind": "compact" if isinstance(fill, CompactCache) else "raw",
                                       "paths": fill.paths, "size": fill.size, "interpolation": fill.interpolation}
    return {"cache": cache, "cache_dir": cache_dir, "max_bytes": max_bytes, "skip": skip}


def check_share(paths: list[str], spec: dict[str, Any]) -> tuple[dict[str, tuple],
                                                                 imagecache.ImageCache | CompactCache | None]:
    """This machine's share of another process's check (fill_spec): the results, and this machine's cache
    of the files, begun and holding the share's images (finish_cache completes it)."""
    c = spec["cache"]
    fill = None if c is None else imagecache.make_cache(c["kind"], c["paths"], c["size"], spec["cache_dir"],
                                                        spec["max_bytes"],
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


def finish_cache(fill: imagecache.ImageCache | CompactCache | None, results: Checked, spec: dict[str, Any],
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
                max_bytes: int = images.MAX_BYTES, interpolation: str = "bilinear",
                image_cache: str = "raw") -> Scanned:
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
                max_bytes: int = images.MAX_BYTES, sep: str = labelfile.DEFAULT_SEP, interpolation: str = "bilinear",
                image_cache: str = "raw") -> Scanned:
    """A label file to evaluate: its test rows, else its val rows (with a split column), else every row."""
    lf = labelfile.read(source, sep)
    part = next((name for name in ("test", "val") if lf.rows(name)), None)
    items = lf.rows(part) if part else lf.items
    good, skipped, cache = check_items(items, shown(lf.source), cache_dir, progress, cache_size, max_bytes,
                                       interpolation, image_cache)
    what = f"the {part} rows of {shown(lf.source)}" if part else f"the images listed in {shown(lf.source)}"
    return lf.classes, good, skipped, cache, what


def check_items(items: list[tuple[str, int]], where: str, cache_dir: str | None, progress: bool,
                cache_size: int | None, max_bytes: int, interpolation: str = "bilinear", image_cache: str = "raw"
                ) -> tuple[list[tuple[str, int]], list[tuple[str, str]], imagecache.ImageCache | CompactCache | None]:
    """(readable items, skipped (path, reason), the cache the check filled, of the kind `image_cache` says:
    raw, compact, auto or none): every file checked once."""
    paths = sorted(p for p, _ in items)
    cache = imagecache.make_cache(image_cache, paths, cache_size, cache_dir, max_bytes,
                                  interpolation) if cache_size else None
    if image_cache == "auto" and isinstance(cache, CompactCache):
        print(imagecache.cache_chosen("compact", image_cache))
    checked = check_files([p for p, _ in items], cache_dir, progress, fill=cache, max_bytes=max_bytes)
    good = [(p, y) for p, y in items if not checked[p][0]]
    if not good:
        raise UsageError(f"no readable images in {where}: nothing to evaluate")
    return good, [(p, checked[p][0]) for p, _ in items if checked[p][0]], cache


def labelled(walk: folders.Walk, folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    return [(p, i) for i, c in enumerate(classes) for p in walk.image_files(folder / c)]


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
