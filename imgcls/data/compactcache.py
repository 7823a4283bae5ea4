"""The compact decoded-image cache (--image-cache compact): each image as the raw cache holds it (its
shorter side resized, centre-cropped square) but stored as a high-quality JPEG, all in one data file
with an index: ~13 KB per photo at 256 px against the raw cache's 196 KB (bench_cache.py). For data
sets whose raw cache would not fit on the disk; reading costs a JPEG decode of a small picture.

Same interface and guarantees as dataset.ImageCache: keyed by the files' identities, the size and the
encoding; built into a temp file and published atomically (the index first, then the data); a file
found damaged or foreign is rebuilt, never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgcls import files
from imgcls.errors import UsageError
from imgcls.settings import cache_root

QUALITY = 90  # JPEG quality: at 256 px, ~1 dB of PSNR from the raw pixels costs no accuracy (bench_cache.py)
VERSION = 2  # 2: the index inside the data file
MAGIC = b"IMGCJPG2"  # the file ends with the index's offset (8 bytes, little-endian) and this


def no_space(path: Path, error: OSError, needed: int | None = None) -> Exception:
    """A full disk under an image cache, as a UsageError (what to do); other errors as they are."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    return UsageError(f"no space left for the image cache in {path.parent}" +
                      (f" (it needs {needed / 2**30:.1f} GB)" if needed else "") + ": free space there, give another "
                      "--cache-dir, or use " + ("--image-cache compact (or --no-image-cache)" if needed else
                                                "--no-image-cache"))


def read_index(fd: int, rows: int) -> np.ndarray | None:
    """The index at the end of an open data file, or None when the file is not a sound one of `rows`
    images: the JPEGs, then the index (rows x (offset, length)), its offset and MAGIC."""
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 16, size - 16) if size >= 16 else b""
        if len(tail) != 16 or tail[8:] != MAGIC:
            return None
        start = int.from_bytes(tail[:8], "little")
        index = np.load(io.BytesIO(os.pread(fd, size - 16 - start, start)))
        ends = index[:, 0] + index[:, 1] if index.ndim == 2 else None
        sound = (index.shape == (rows, 2) and index.dtype == np.int64 and (index >= 0).all()
                 and int(ends.max(initial=0)) <= start)
        return index if sound else None
    except (OSError, ValueError, EOFError):
        return None


class CompactCache:
    """`load(path)`: the image as a size x size x 3 uint8 array, or None when it cannot be read (it says
    why); `decoder`: the version of the decoding behind it, part of the key. One file holds the JPEGs
    and their index, so it is published (and replaced) whole: a reader never pairs an index with
    another build's data."""

    def __init__(self, paths: list[str], size: int, load: Callable[[str], np.ndarray | None], decoder: Any,
                 cache_dir: str | None = None, interpolation: str = "bilinear"):
        self.paths, self.size, self.load, self.interpolation = paths, size, load, interpolation
        stats = [files.identity(p) for p in paths]
        key = hashlib.sha1(json.dumps([decoder, VERSION, QUALITY, size, stats]).encode()).hexdigest()[:20]
        folder = cache_root(cache_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{key}-{size}px-q{QUALITY}.jpgs"
        self.row = {p: i for i, p in enumerate(paths)}
        self._index: np.ndarray | None = None  # rows x (offset, length); length 0: unreadable
        self._fd: int | None = None
        self._temp: tuple | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """The file published and sound; a damaged or foreign one is removed so it is rebuilt."""
        if not files.is_regular(self.path):
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            sound = read_index(fd, len(self.paths)) is not None
        finally:
            os.close(fd)
        if not sound:
            print(f"warning: rebuilding a damaged image cache ({self.path.name})", file=sys.stderr, flush=True)
            self.path.unlink(missing_ok=True)
        return sound

    def begin(self) -> None:
        if self._temp is not None:
            return
        files.remove_stale_temps(self.path.parent)
        self._temp = files.open_temp(self.path)
        self._index = np.zeros((len(self.paths), 2), dtype=np.int64)
        self._done = np.zeros(len(self.paths), dtype=bool)
        self._end = 0

    def put(self, path: str, pixels: np.ndarray | None) -> None:
        """One image decoded elsewhere (by the file check); None marks it unreadable."""
        i = self.row[path]
        data = b""
        if pixels is not None:
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "JPEG", quality=QUALITY)
            data = out.getvalue()
        with self._lock:
            f = self._temp[0]
            try:  # (seek flushes what is buffered: a full disk can show there too)
                f.seek(self._end)
                f.write(data)
            except OSError as e:
                raise no_space(self.path, e) from None
            self._index[i] = (self._end, len(data))
            self._end += len(data)
            self._done[i] = True

    def build(self, progress: bool = True, skip: set[str] = frozenset()) -> None:
        """Encode what put() has not given (except `skip`: files known to be unreadable) and publish."""
        if self.ready:
            self.discard()
            return
        self.begin()
        todo = [p for i, p in enumerate(self.paths) if not self._done[i] and p not in skip]
        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                desc = f"caching images ({self.size}px, compact)"
                list(tqdm(pool.map(lambda p: self.put(p, self.load(p)), todo), total=len(todo), desc=desc,
                          disable=None if progress and todo else True, leave=False))
            f = self._temp[0]
            try:
                f.seek(self._end)
                np.save(f, self._index)
                f.write(self._end.to_bytes(8, "little") + MAGIC)
                f.flush()
            except OSError as e:
                raise no_space(self.path, e) from None
            files.publish(*self._temp, self.path)
            self._temp = None
        finally:
            self.discard()

    def discard(self) -> None:
        if self._temp is not None:
            files.discard(*self._temp)
            self._temp = None
        self._index = None

    def get(self, path: str) -> np.ndarray | None:
        if self._fd is None:  # opened lazily: each DataLoader worker opens its own
            self._fd = os.open(self.path, os.O_RDONLY)
            self._index = read_index(self._fd, len(self.paths))
            if self._index is None:
                raise OSError(f"the image cache {self.path} was damaged while in use")
        offset, length = self._index[self.row[path]]
        if not length:
            return None
        try:
            data = os.pread(self._fd, int(length), int(offset))
            return np.array(Image.open(io.BytesIO(data), formats=("JPEG",)).convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # damaged on disk since it was built: the file decoded instead
            print(f"warning: {path}: its entry in the image cache {self.path.name} is damaged ({e}); decoded from "
                  "the file instead (delete the cache file to rebuild it)", file=sys.stderr, flush=True)
            return self.load(path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None, "_fd": None, "_temp": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
