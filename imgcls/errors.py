"""The errors every script answers the same way (see cli.cli): bad input, a failed run, a diverged one."""

from __future__ import annotations

import sys
from typing import NoReturn


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2, before anything is written."""


class WeightsUnavailable(UsageError):
    """Published weights that could not be downloaded (no internet, say): `what` happened and the
    `alternatives` to a download; train.py adds the exact command that trains offline (offline())."""

    def __init__(self, what: str, alternatives: str):
        super().__init__(f"{what}: {alternatives}, or use --mode scratch")
        self.what, self.alternatives = what, alternatives

    def offline(self, command: str) -> str:
        return f"{self.what}. Without internet, train from scratch: {command}; or {self.alternatives}"


class TrainingError(Exception):
    """A run cannot go on (NaN loss, out of memory, unreadable data): one line, exit status 1."""


class Diverged(TrainingError):
    """A loss became NaN or infinite: the run stops at once, its last good checkpoints kept."""


def fail(message: str, status: int = 2) -> NoReturn:
    """Print a one-line error for a person (no traceback) and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def first_line(e: BaseException) -> str:
    """An error's first line, short enough for a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
