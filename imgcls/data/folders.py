"""What a data folder holds: its layout, its class folders, the files to read, and what is left out and why.

The rules (docs/data.md, "Your data"):
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

from imgcls.errors import UsageError
from imgcls.settings import TrainConfig, cache_path

IGNORED = {"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN", "System Volume Information",
           "lost+found", "__pycache__"}
VAL_NAMES = ("val", "valid", "validation")
SPLIT_NAMES = ("train", *VAL_NAMES, "test")
DEFAULT_MAX_FILE_MB = TrainConfig.max_file_mb
DEFAULT_MAX_BYTES = int(DEFAULT_MAX_FILE_MB * 2**20)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED


def class_of(path: str | os.PathLike, classes: list[str]) -> int | None:
    """The class an image is labelled with by its folder's name, when that names one of `classes`."""
    name = Path(path).parent.name
    return classes.index(name) if name in classes else None


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed or drawn: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Walk:
    """What walking the folders of one data set found; shared across its class folders and splits, so
    a directory or file reached twice (through links) is counted once in the whole data set, under its
    own path rather than a link's."""
    max_bytes: int = DEFAULT_MAX_BYTES
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): never read
    ignored: list[str] = field(default_factory=list)  # folders left out by name
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (a file, another path to it)
    dirs: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, inode) -> first path
    files: dict[tuple[int, int], str] = field(default_factory=dict)
    homes: dict[str, str] = field(default_factory=dict)  # real path -> claimed folder (root, split, class)

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

    def claim(self, folder: Path) -> str:
        """A folder of the data set's own structure (root, split, class): links to it or into it from
        elsewhere add nothing. Returns the path that claimed it first (another one: the same folder)."""
        try:
            st = os.stat(folder)
        except OSError:
            return str(folder)
        self.homes.setdefault(os.path.realpath(folder), str(folder))
        return self.dirs.setdefault((st.st_dev, st.st_ino), str(folder))

    def note_ignored(self, path: str) -> None:
        if path not in self.ignored:
            self.ignored.append(path)

    def image_files(self, folder: Path) -> list[str]:
        """Every readable-looking file below `folder`, sorted; each directory walked once, real
        entries before links, so a file's own path is the one that counts."""
        out: list[str] = []
        home = os.path.realpath(folder)
        real, linked = [str(folder)], []
        while real or linked:
            d = real.pop() if real else linked.pop()
            try:
                st = os.stat(d)
            except OSError as e:
                self.skipped.append((d, f"unreadable folder ({e.strerror})"))
                continue
            first = self.dirs.setdefault((st.st_dev, st.st_ino), d)
            if first != d:
                self.skipped.append((d, f"folder already walked: another path to {shown(first)}"))
                continue
            try:
                entries = sorted(os.scandir(d), key=lambda e: (e.is_symlink(), e.name))
            except OSError as e:
                self.skipped.append((d, f"unreadable folder ({e.strerror})"))
                continue
            subdirs: list[str] = []
            for entry in entries:
                if is_ignored(entry.name):
                    if not entry.name.startswith(".") and entry.is_dir():
                        self.note_ignored(entry.path)
                    continue
                kind = self.classify(entry, home)
                if kind == "dir":
                    (linked if entry.is_symlink() else subdirs).append(entry.path)
                elif kind == "file":
                    out.append(entry.path)
            real += reversed(subdirs)
        return sorted(out)

    def owner(self, real: str) -> str | None:
        """The claimed folder (class, split or root) that a real path lies in, the nearest one."""
        for p in (real, *map(str, Path(real).parents)):
            if p in self.homes:
                return self.homes[p]
        return None

    def classify(self, entry: os.DirEntry, home: str) -> str:
        """'dir', 'file', or 'skip' (noted with its reason), from stat() alone: nothing is opened."""
        try:
            st = entry.stat()  # follows links
        except OSError as e:
            self.skipped.append((entry.path, "broken link" if entry.is_symlink() else f"unreadable ({e.strerror})"))
            return "skip"
        reason = self.link_problem(entry, home, stat.S_ISDIR(st.st_mode)) if entry.is_symlink() else None
        if reason is None and stat.S_ISDIR(st.st_mode):
            return "dir"
        reason = reason or special_file(st.st_mode) or too_large(st.st_size, self.max_bytes)
        if reason is None:
            first = self.files.setdefault((st.st_dev, st.st_ino), entry.path)
            if first != entry.path:
                reason = f"the same file as {shown(first)} (reached by another path)"
                self.aliases.append((first, entry.path))
        if reason is not None:
            self.skipped.append((entry.path, reason))
            return "skip"
        return "file"

    def link_problem(self, entry: os.DirEntry, home: str, is_dir: bool) -> str | None:
        """A link to a folder above it (a loop), or into another class folder (whose label its
        images have), is not followed."""
        target = os.path.realpath(entry.path)
        here = os.path.realpath(os.path.dirname(entry.path))
        if is_dir and (here == target or here.startswith(target + os.sep)):
            return f"a link loop back to a folder above it ({shown(target)})"
        owner = self.owner(target)
        if owner is not None and os.path.realpath(owner) != home and not home.startswith(os.path.realpath(owner)
                                                                                          + os.sep):
            if not is_dir:  # the same file under its own path, for the leakage report
                self.aliases.append((os.path.join(owner, os.path.relpath(target, os.path.realpath(owner))),
                                     entry.path))
            return f"a link into {shown(owner)}, whose images it holds"
        return None


TOO_LARGE = "too large for an image"


def megabytes(size: int) -> str:
    """Whole MB, or two digits under 10 MB (a limit of 0.005 MB is not '0 MB')."""
    mb = size / 2**20
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.2g}"


def too_large(size: int, max_bytes: int) -> str | None:
    if size <= max_bytes:
        return None
    return (f"{TOO_LARGE} ({megabytes(size)} MB; the limit is {megabytes(max_bytes)} MB, "
            "see --max-file-mb)")


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
    dirs: dict[str, Path] = {}
    for d in walk.subfolders(root):
        if d.name.lower() in dirs and d.name.lower() in SPLIT_NAMES:
            raise UsageError(f"{shown(root)} has both {dirs[d.name.lower()].name}/ and {d.name}/: keep one")
        dirs.setdefault(d.name.lower(), d)
    if "train" not in dirs or not walk.subfolders(dirs["train"]):
        return root, None, None  # flat; 'train' (if any) is a class of images
    others = sorted(name for name, d in dirs.items() if name not in SPLIT_NAMES)
    if others:
        classes = ", ".join(dirs[n].name for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(f"{shown(root)} has a train/ folder with sub-folders and other folders beside it ({classes}): "
                         f"for a split layout move {classes} under train/ (or val/), for a flat one move the "
                         f"images in train/'s sub-folders up into train/")
    vals = [dirs[n] for n in VAL_NAMES if n in dirs]
    if len(vals) > 1:
        raise UsageError(f"{shown(root)} has {' and '.join(v.name + '/' for v in vals)}: keep one validation folder")
    return dirs["train"], (vals[0] if vals else None), dirs.get("test")


def skipped_lines(items: list[tuple[str, str]]) -> str:
    """skipped.txt: one "path<TAB>reason" line per file left out."""
    return "".join(f"{listed(p)}\t{reason}\n" for p, reason in items)


def listed(path: str | os.PathLike) -> str:
    """A path for a line of a list (skipped.txt, the check's report): shown(), with tabs and line
    breaks in names written as \\t and \\n so that one file stays one line."""
    return shown(path).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def is_another_path(reason: str) -> bool:
    """Whether a file was skipped as another path to an image that is read (Walk's reasons)."""
    return reason.startswith(("the same file as ", "a link into "))


def ignored_line(ignored: list[str]) -> str:
    """The folders left out by name, said by whatever reads a folder (training, evaluation)."""
    return f"ignored folder(s) by name: {', '.join(shown(p) for p in ignored[:5])}" + (" ..." if len(ignored) > 5
                                                                                        else "")


def check_outside(data: str | os.PathLike | None, path: str | os.PathLike, what: str) -> None:
    """A folder we write (a run, a report, the caches) inside a data folder would be read from then on as
    part of the data: its files as images, its folders as classes. Refused, before anything is written."""
    if data is None or not os.path.isdir(data):
        return  # a label file lists its images: nothing else beside it is read
    inside, home = os.path.realpath(path), os.path.realpath(data)
    root = os.path.dirname(home)  # a data set's train/, val/ or test/: beside it would break the data set's layout
    if os.path.basename(home).lower() in SPLIT_NAMES and os.path.isdir(os.path.join(root, "train")):
        home, data = root, root
    if inside == home or inside.startswith(home.rstrip(os.sep) + os.sep):
        raise UsageError(f"{what} {shown(path)} is inside the data folder {shown(data)}, where it would be read as "
                         f"images and classes: put it outside {shown(data)}")


def check_cache_outside(data: str | os.PathLike | None, cache_dir: str | None) -> None:
    check_outside(data, cache_path(cache_dir), "the cache folder (--cache-dir, else $IMGCLS_CACHE)")
