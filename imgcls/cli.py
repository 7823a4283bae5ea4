"""Command lines: the parser and help format every script shares, the options they share (defined once,
here), and the error handler every entry script runs under. No torch here: a command line is checked,
and a typo answered, before torch loads."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import gc
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from imgcls.errors import TrainingError, UsageError, fail
from imgcls.recipes import RECIPE_FIELDS, RECIPES
from imgcls.settings import DEFAULT_MAX_FILE_MB, HELP, MAX_FILE_MB_RULE, TrainConfig, check_device


def printable_output() -> None:
    """File and class names that are not UTF-8 print as \\udcXX escapes instead of failing the run
    (stderr does this already; stdout would raise UnicodeEncodeError)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


_own_process = False  # set by script(): this process is a command's own, not a test's or another program's
_frozen = False  # imports_done has frozen the imports once


def script(entry: Callable[[list[str] | None], int], file: str) -> NoReturn:
    """What an entry script (`file`) runs as a program: cli(entry). Whether the process is the command's
    own (see imports_done) is read from the interpreter's command line: `python train.py`, `python -m
    train` and torchrun's workers are; a notebook's `%run train.py`, runpy and exec run the script as
    `__main__` inside another program, whose objects are not ours to freeze."""
    global _own_process
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    _own_process = started_as(file, sys.orig_argv[1:], getattr(spec, "origin", None))
    sys.exit(cli(entry))


def started_as(file: str, interpreter_args: list[str], main_origin: str | None = None) -> bool:
    """Whether the interpreter was started to run `file`, read from its arguments (after its own name) as
    Python reads them: flags may be grouped (-uB), and -c, -m, -W and -X take a value, attached (-Werror)
    or next. For -m, the running __main__ module must also come from `file` (`main_origin`), not from a
    module of the same name elsewhere."""
    args, i = interpreter_args, 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = args[i + 1] if arg == "--" and i + 1 < len(args) else arg
            return script not in ("-", "--") and same_file(script, file)
        if arg.startswith("--"):  # a long option; only this one takes a value
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        i += 1
        for j, flag in enumerate(arg[1:], start=2):
            if flag in "cmWX":
                value = arg[j:] or (args[i] if i < len(args) else "")
                i += 0 if arg[j:] else 1
                if flag == "c":
                    return False
                if flag == "m":
                    return value == Path(file).stem and main_origin is not None and same_file(main_origin, file)
                break
    return False


def typed(path: str | os.PathLike) -> str:
    """A path as it must be typed in a command we print for the user to run: quoted where a shell would
    split or expand it (`my $run`), names that are not UTF-8 with \\xNN."""
    return shlex.quote(os.fsencode(path).decode("utf-8", "backslashreplace"))


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def imports_done() -> None:
    """Torch and the modules a command needs are loaded. In a command's own process their ~400,000
    objects are taken out of the garbage collector's rounds (gc.freeze): a full round walks them all
    (0.2 s here), and a 15-second training run made seven, plus one at exit. Not in a test or another
    program calling us: what is frozen is never collected, and later garbage would be kept. Once per
    process: a k-fold job calls it for each fold, and a later call would freeze the last fold's garbage."""
    global _frozen
    if _own_process and not _frozen:
        gc.freeze()
        _frozen = True


def cli(entry: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point with errors for people, the same for every script: bad input (UsageError)
    is one line and exit status 2, a failed run (TrainingError, out of GPU memory) one line and 1,
    Ctrl-C before anything was saved 130. Tracebacks are for bugs."""
    printable_output()
    try:
        return entry(argv)
    except UsageError as e:
        fail(str(e), 2)
    except TrainingError as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say, and no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's, named so that this module needs no torch
            fail("out of GPU memory: try a smaller --batch-size (or --img-size)", 1)
        raise


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each option's default shown once (an option whose
    default is computed says so in its own help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
        return text if shown else f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and a "did you mean" for a misspelled option."""

    def __init__(self, doc: str | None = None, **kwargs: Any):
        kwargs.setdefault("description", doc)
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if not kwargs.get("help") and "-h" not in args:
            raise TypeError(f"option {args[0]} needs a help text")  # a bug: every option says what it does
        return super().add_argument(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        unknown = [w for w in getattr(self, "argv", []) if w.startswith("--") and w.split("=")[0] not in known
                   and not any(k.startswith(w.split("=")[0]) for k in known)]  # (argparse takes abbreviations)
        if unknown and not message.startswith("unrecognized arguments: "):
            message = f"unrecognized arguments: {' '.join(unknown)}"  # the cause of a 'required' error, say
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
                break
        fail(f"{message}; see python {self.prog} --help")


def add_shared(parser: argparse.ArgumentParser, *names: str, batch_size: int = 256) -> None:
    """The shared options, by field name (checkpoint, device, batch_size, workers, cache_dir, max_file_mb, amp,
    label_sep)."""
    kinds = {"checkpoint": {}, "device": {"default": "auto"}, "batch_size": {"type": int, "default": batch_size},
             "workers": {"type": int}, "cache_dir": {}, "max_file_mb": {"type": float, "default": DEFAULT_MAX_FILE_MB},
             "amp": {"action": argparse.BooleanOptionalAction, "default": False}, "label_sep": {}}
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), help=HELP[name], **kinds[name])


def check_shared(args: argparse.Namespace) -> None:
    """The shared numbers, refused before anything loads."""
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError("--batch-size must be at least 1")
    if (getattr(args, "workers", None) or 0) < 0:
        raise UsageError("--workers cannot be negative")
    if not 0 < getattr(args, "max_file_mb", 1) < math.inf:
        raise UsageError(MAX_FILE_MB_RULE)
    if getattr(args, "label_sep", None) == "":
        raise UsageError("--label-sep cannot be empty: give the character between an image's labels, e.g. ';'")
    check_device(getattr(args, "device", "auto"))


def add_options(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add one --option per dataclass field; unset options stay absent from the namespace (so a resume
    can tell what was given), with the field's default shown in the help."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if not meta.pop("cli", True):  # set by the toolkit itself, stored with the run
            continue
        if f.name in RECIPE_FIELDS:
            seed, modern = RECIPES["seed"][f.name], RECIPES["modern"][f.name]
            help_text += f" (default: the recipe's: seed {seed}, modern {modern}" + \
                (" x sqrt(batch/64)" if f.name == "lr" else "") + ")"
        elif "default" not in help_text and f.default is not None:
            help_text += f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if f.name == "image_cache":  # --image-cache [KIND] and --no-image-cache, as when it was on/off
            parser.add_argument(flag, nargs="?", const="auto", help=help_text, default=argparse.SUPPRESS, **meta)
            parser.add_argument("--no-image-cache", dest=f.name, action="store_const", const="none",
                                default=argparse.SUPPRESS, help="no image cache (--image-cache none)")
        elif isinstance(f.default, bool) or meta.pop("switch", False):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text,
                                default=argparse.SUPPRESS)
        else:
            meta.setdefault("type", type(f.default))
            parser.add_argument(flag, help=help_text, default=argparse.SUPPRESS, **meta)


def command_line(settings: dict[str, Any], **changes: Any) -> str:
    """`python train.py` with the options in `settings` (as train.py reads them) changed by `changes`, as a
    user would type it: paths inside the working directory relative to it, every word quoted for a shell."""
    options = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    words = ["python", "train.py"]
    for key, value in {**settings, **changes}.items():
        if key not in options or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
            continue
        if key in ("data", "weights", "out", "cache_dir") and value != "demo" and os.path.isabs(str(value)):
            relative = os.path.relpath(str(value))
            value = value if relative.startswith("..") else relative
        words += [flag, shlex.quote(str(value))]
    return " ".join(words)
