"""Ctrl-C and SIGTERM during a run: a stop is requested and taken at the end of a step, never mid-write."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

# ----------------------------------------------------------------------------- stopping cleanly

class HardStop(KeyboardInterrupt):
    """A second Ctrl-C: raised at once, wherever the run is; nothing from that moment is saved."""


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM during training: the step (or validation batch) under way finishes,
    then KeyboardInterrupt is raised where the state is consistent, so what is saved resumes exactly.
    A second signal interrupts at once."""
    requested = False


def check_stop() -> None:
    if StopRequest.requested:
        StopRequest.requested = False
        raise KeyboardInterrupt


def stop_requested() -> bool:
    return StopRequest.requested


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) raises KeyboardInterrupt like Ctrl-C, so what is
    half-written (a cache's temp file) is cleaned up on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM ask for a clean stop (see StopRequest)."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if StopRequest.requested:
            raise HardStop
        StopRequest.requested = True

    StopRequest.requested = False
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        StopRequest.requested = False
