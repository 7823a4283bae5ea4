"""The image cache: decoded images kept raw (memory-mapped) or compact, chosen by the space they need."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from imgcls import files
from imgcls.data import compactcache, images
from imgcls.data.compactcache import CompactCache
from imgcls.errors import UsageError
from imgcls.settings import cache_root

CACHE_VERSION = 4  # of the decoded pixels: a change in decoding makes new caches (3: EXIF orientation; 4: mode I)


# ----------------------------------------------------------------------------- datasets and caches

class ImageCache:
    """Every image of a list decoded and resized once into a uint8 .npy file, memory-mapped.

    The key covers each file's identity (path, size, mtime, ctime), the pixel size and the decoder's
    version, so a changed file or preprocessing builds a new cache instead of reading a stale one.
    Files found in the cache folder are checked (regular file, shape, dtype) before they are used;
    a bad one is rebuilt, never trusted.
    """

    def __init__(self, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = images.MAX_BYTES,
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
            error = compactcache.no_space(self.path, e, int(np.prod(self.shape)))
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
                self._pixels[i] = images.load_image(self.paths[i], self.size, self.max_bytes, self.interpolation)
                self._ok[i] = True
            except (images.BadImage, OSError) as e:
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


def cache_kind(kind: str, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = images.MAX_BYTES,
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


def make_cache(kind: str, paths: list[str], size: int, cache_dir: str | None = None, max_bytes: int = images.MAX_BYTES,
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
        return images.load_image(path, size, max_bytes, interpolation)
    except (images.BadImage, OSError) as e:
        warn(f"skipped {path}: {e}")
        return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
