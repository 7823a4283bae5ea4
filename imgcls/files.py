"""Files that stay right under kills and parallel runs: atomic writes, run-folder locks, file identities.

Every file this toolkit publishes (checkpoints, caches, split.json, metrics.csv, pictures) is written
to a temporary file that only this process can have created (random name, O_EXCL, so a planted
symlink is never followed), fsynced, and renamed over the target: a reader sees the old file or the
new one, never half of one; a process that dies leaves at most its own temp file. Cache keys use
`identity()`: a file replaced by another of the same size (even with its mtime copied) is noticed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from imgcls.cli import typed
from imgcls.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None


TEMP_SUFFIX = ".tmp"


def open_temp(path: Path) -> tuple[IO[bytes], Path]:
    """An exclusively created temp file beside `path` (same file system, so the rename is atomic), with
    the permissions a plain new file gets (mkstemp's are owner-only)."""
    fd, name = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=TEMP_SUFFIX)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask())
    if fcntl is not None:  # held while it is written: remove_stale_temps leaves it alone
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return os.fdopen(fd, "w+b"), Path(name)


def umask() -> int:
    """The process umask, read without changing it (os.umask sets it: not safe beside other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def publish(f: IO[bytes], tmp: Path, path: Path) -> None:
    """fsync and close the temp file, and rename it over `path`."""
    f.flush()
    os.fsync(f.fileno())
    if fcntl is not None:  # renamed while still open and locked: never taken for a stale temp file
        os.replace(tmp, path)
        f.close()
    else:  # (Windows renames only closed files)
        f.close()
        os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def discard(f: IO[bytes], tmp: Path) -> None:
    """Close and remove a temp file that will not be published."""
    with contextlib.suppress(OSError):
        f.close()
    tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(file)` into a temp file, then publish it as `path`; on any failure the temp is removed."""
    f, tmp = open_temp(path)
    try:
        write(f)
        publish(f, tmp, Path(path))
    except BaseException:
        discard(f, tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # what a spreadsheet reads as a formula, and the escape


def csv_cell(value: object) -> str:
    """A cell no spreadsheet runs as a formula (OWASP's CSV injection advice): text starting with = + - @, a
    tab or a carriage return gets a ' in front, and so does text starting with ' itself, so that a reader
    gets every name back exactly by taking one leading ' off a cell that has one. Numbers are written as
    they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable[object]]) -> None:
    """A CSV for people and programs (atomically): every text cell through csv_cell, names that are not
    UTF-8 written as their bytes on disk."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    atomic_write_text(path, text.getvalue())


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def identity(path: str | os.PathLike) -> list:
    """What a cache key needs to know of a file: path, size, mtime and ctime (in ns). ctime changes
    whenever a file is replaced or rewritten and cannot be set back, unlike mtime (`cp -p`, rsync)."""
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), -1, -1, -1]
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def is_regular(path: Path) -> bool:
    """A plain file, not a symlink (a cache file that is a link was planted, not written by us)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_temp_files(folder: Path) -> None:
    """Temp files a killed process left in a folder that this process now owns (a locked run folder)."""
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_stale_temps(folder: Path, min_age_s: float = 60.0) -> None:
    """Temp files in a shared folder (the caches) that no process is writing: left by a killed build.
    A writer holds a lock on its temp file (open_temp); one a minute old that can be locked is stale."""
    import time

    if fcntl is None:
        return
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > min_age_s:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer is alive
                if os.path.exists(tmp) and os.stat(tmp).st_ino == st.st_ino:
                    os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


class FolderLock:
    """An exclusive lock on a folder, held while a run uses it: a POSIX lock on its `.lock` file, which
    the kernel releases when the process ends in any way (a killed run leaves no stale lock) and which
    forked children (DataLoader workers outliving a killed run) do not inherit."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.fd = -1
        if fcntl is None:
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(Path(folder) / self.NAME, flags, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise BlockingIOError(e.errno, f"{folder} is locked by another process") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_folder(path: Path) -> Path:
    """Create `path`, or path-2, path-3, ...: the first that does not exist yet, atomically (mkdir), so
    a report never replaces another one, not even one written at the same moment by another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UsageError(f"{path}-2 ... {path}-9999 all exist: pass --out")


@contextlib.contextmanager
def report_folder(given: str | None, default: Path) -> Iterator[Path]:
    """The folder a report goes to: --out (new or empty), else `default` claimed (numbered when taken).
    Made before the work starts, so two processes never share one; removed again, when it was made here
    and is still empty, if the work fails."""
    if given:
        path = Path(given)
        check_new_folder(path)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
    else:
        path, created = claim_folder(default), True
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def check_new_folder(path: Path, option: str = "--out") -> None:
    """A folder to write into must be new or empty: what is there is never replaced silently."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{option} {path} already holds {'files' if path.is_dir() else 'a file'}: give a new or "
                         "empty folder")


def check_run_dir(run_dir: Path, in_place: bool, overwrite: bool) -> None:
    """Never reuse another run's folder by accident (checked first, and again under the folder's lock)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file: give a folder for the run")
    held = run_dir.exists() and any(p.name != FolderLock.NAME and not (p.name.startswith(".") and
                                                                      p.name.endswith(TEMP_SUFFIX))
                                    for p in run_dir.iterdir())  # (a run killed writing its first file holds none)
    if held and not in_place and not overwrite:
        raise UsageError(f"{run_dir} already holds a run: pass --resume {typed(run_dir)} to continue it, "
                         "--overwrite to replace it, or another --out")


def missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, innermost first (removed again by an undo)."""
    return [p for p in path.absolute().parents if not p.exists()]
