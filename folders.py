"""What a data folder holds: its layout, its class folders, the files to read, and what is left out and why.

The rules (README, "Your data"):
- A class is a sub-folder. Names starting with "." and the system clutter in IGNORED (`__MACOSX`,
  `Thumbs.db`, ...) are ignored, and every ignored folder is named in the output; any other name,
  `__background__` included, is a class.
- `train/` (+ `val/`, `valid/` or `validation/`, + `test/`) is a split layout only when `train/` has
  class sub-folders and nothing else stands beside those folders; a flat data set may have classes
  called train, val or test.
- Only regular files are read (file symlinks are followed). FIFOs, sockets and devices are skipped by
  their type, files over the size limit by their size, both from stat() without opening them.
- Each directory is walked once, by its real path: a symlink loop or a link to a folder already
  walked adds nothing and is reported; a file reached by two paths is counted once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from config import TrainConfig, UsageError

IGNORED = {"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN", "System Volume Information",
           "lost+found", "__pycache__"}
VAL_NAMES = ("val", "valid", "validation")
SPLIT_NAMES = ("train", *VAL_NAMES, "test")
DEFAULT_MAX_FILE_MB = TrainConfig.max_file_mb


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed or drawn: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Walk:
    """What walking the folders of one data set found; shared across its class folders and splits, so
    a directory or file reached twice (through links) is counted once in the whole data set."""
    max_bytes: int = int(DEFAULT_MAX_FILE_MB * 2**20)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): never read
    ignored: list[str] = field(default_factory=list)  # folders left out by name
    dirs: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, inode) -> first path
    files: dict[tuple[int, int], str] = field(default_factory=dict)

    def subfolders(self, folder: Path) -> list[Path]:
        """Visible sub-folders (links to folders included), sorted; ignored ones are noted once."""
        out = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if not is_dir:
                continue
            if is_ignored(entry.name):
                if not entry.name.startswith("."):
                    self.note_ignored(entry.path)
                continue
            out.append(Path(entry.path))
        return out

    def claim(self, folder: Path) -> None:
        """A folder of the data set's own structure (root, split, class): links to it add nothing."""
        try:
            st = os.stat(folder)
        except OSError:
            return
        self.dirs.setdefault((st.st_dev, st.st_ino), str(folder))

    def note_ignored(self, path: str) -> None:
        if path not in self.ignored:
            self.ignored.append(path)

    def image_files(self, folder: Path) -> list[str]:
        """Every readable-looking file below `folder`, sorted, each directory walked once."""
        out: list[str] = []
        stack = [str(folder)]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
            except OSError as e:
                self.skipped.append((d, f"unreadable folder ({e.strerror})"))
                continue
            first = self.dirs.setdefault((st.st_dev, st.st_ino), d)
            if first != d:
                why = "a link loop back" if d.startswith(first + os.sep) else "another path"
                self.skipped.append((d, f"folder already walked: {why} to {shown(first)}"))
                continue
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                self.skipped.append((d, f"unreadable folder ({e.strerror})"))
                continue
            subdirs = []
            for entry in entries:
                if is_ignored(entry.name):
                    if not entry.name.startswith(".") and entry.is_dir():
                        self.note_ignored(entry.path)
                    continue
                kind = self.classify(entry)
                if kind == "dir":
                    subdirs.append(entry.path)
                elif kind == "file":
                    out.append(entry.path)
            stack += reversed(subdirs)
        return sorted(out)

    def classify(self, entry: os.DirEntry) -> str:
        """'dir', 'file', or 'skip' (noted with its reason), from stat() alone: nothing is opened."""
        try:
            st = entry.stat()  # follows links
        except OSError as e:
            self.skipped.append((entry.path, "broken link" if entry.is_symlink() else f"unreadable ({e.strerror})"))
            return "skip"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        reason = special_file(st.st_mode)
        if reason is None and st.st_size > self.max_bytes:
            reason = (f"too large for an image ({st.st_size / 2**20:,.0f} MB; the limit is "
                      f"{self.max_bytes / 2**20:,.0f} MB, see --max-file-mb)")
        if reason is None:
            first = self.files.setdefault((st.st_dev, st.st_ino), entry.path)
            if first != entry.path:
                reason = f"the same file as {shown(first)} (reached by another path)"
        if reason is not None:
            self.skipped.append((entry.path, reason))
            return "skip"
        return "file"


def special_file(mode: int) -> str | None:
    """Why a file that is not a regular file is not read (reading a FIFO would wait forever)."""
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"not a regular file: {what}"
    return None if stat.S_ISREG(mode) else "not a regular file"


def find_layout(root: Path, walk: Walk | None = None) -> tuple[Path, Path | None, Path | None]:
    """(train folder, val folder or None, test folder or None) of a data set root; a flat folder is
    its own train folder. A split layout needs class sub-folders in train/ and nothing beside the
    split folders; where both readings are possible the user is asked to make it unambiguous."""
    walk = walk or Walk()
    dirs = {d.name.lower(): d for d in walk.subfolders(root)}
    if "train" not in dirs or not walk.subfolders(dirs["train"]):
        return root, None, None  # flat; 'train' (if any) is a class of images
    others = sorted(name for name, d in dirs.items() if name not in SPLIT_NAMES)
    if others:
        classes = ", ".join(dirs[n].name for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(f"{shown(root)} has a train/ folder with sub-folders and other folders beside it ({classes}): "
                         f"for a split layout move {classes} under train/ (or val/), for a flat one move the "
                         f"images in train/'s sub-folders up into train/")
    val = next((dirs[n] for n in VAL_NAMES if n in dirs), None)
    return dirs["train"], val, dirs.get("test")
