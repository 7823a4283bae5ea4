"""Dynamic batching: images of requests that arrive together go through the model as one batch.

One model thread takes what is waiting: at most `max_batch` images, and waits at most `max_wait_s` after
the oldest one arrived for more (so a lone request waits that long at most, and under load the batch fills
while the previous one runs). A request's images are queued together, so they share a batch where they fit.
Requests decode in other threads, and say so (`expecting`): a batch that is not full waits for images
already being decoded, up to `join_wait_s` (set by the server: docs/serving.md). Without it, 16 clients on
2 cores ran MobileNetV2 in batches of 8, 3, 8, 1, ..., each small one costing nearly as much as a full one;
a lone request has nothing being decoded beside it and never waits. Where the model has every core
(`exclusive`), a decode starts only between batches (`wait_between_batches`): a decoding thread that takes
a core from one of the model's threads holds up all of them, as they wait for each other at every operation.
Other work on the model (an explanation, whose hooks would see a batch's activations) runs on the same
thread, between batches, in the order it arrived with the images; decoding waits for it as for a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from imgcls.machine import set_thread_threads

log = logging.getLogger("imgcls.serve")


class Full(Exception):
    """More images are waiting than the queue holds: the request is turned away (503, retry later)."""


@dataclass
class Item:
    image: torch.Tensor
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs `model` (uint8 N x 3 x H x W -> N x ... outputs on the CPU) on batches of queued images."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float,
                 max_queue: int, threads: int | None = None):
        self.model, self.max_batch, self.max_wait_s, self.max_queue = model, max_batch, max_wait_s, max_queue
        self.threads = threads
        self.join_wait_s = 0.0  # how long a batch waits for images being decoded (set once the model is timed)
        self.exclusive = False  # decoding waits while a batch runs (set by the server)
        self.between = threading.Event()  # set while the model thread runs neither a batch nor a job
        self.between.set()
        self.coming = 0  # images being decoded, to be submitted
        self.items: deque[Item] = deque()
        self.jobs: deque[tuple[Callable[[], Any], Future, float]] = deque()  # (job, its future, when it came)
        self.cond = threading.Condition()
        self.stopping = False
        self.batches = self.images = 0  # served so far (GET /health)
        self.observe: Callable[[int, float], None] | None = None  # told each batch's size and time (GET /metrics)
        self.thread = threading.Thread(target=self.loop, name="model", daemon=True)
        self.thread.start()

    def submit(self, images: list[torch.Tensor]) -> list[Future]:
        """Queue a request's images together; a future per image, for its row of the model's output."""
        items = [Item(x) for x in images]
        with self.cond:
            if self.stopping:
                raise Full("the server is stopping")
            if len(self.items) + len(items) > self.max_queue and self.items:
                raise Full(f"{len(self.items)} images are waiting for the model (serve.py --max-queue "
                           f"{self.max_queue})")
            self.items.extend(items)
            self.cond.notify_all()
        return [it.future for it in items]

    @contextlib.contextmanager
    def expecting(self, n: int) -> Iterator[None]:
        """`n` images are being decoded: a batch that is not full may wait for them. Submit them before the
        block ends (those that fail to decode are simply never submitted)."""
        with self.cond:
            self.coming += n
        try:
            yield
        finally:
            with self.cond:
                self.coming -= n
                self.cond.notify_all()

    def wait_between_batches(self) -> None:
        """Return once no batch runs (at once unless `exclusive`): for a decoding thread, before it decodes."""
        if self.exclusive:
            self.between.wait()

    async def predict(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self.results(self.submit(images))

    @staticmethod
    async def results(futures: list[Future]) -> list[torch.Tensor]:
        """The rows of submitted images, once run; the images not yet run are dropped if the caller stops
        waiting (it timed out or went away)."""
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            for f in futures:  # a request that timed out or went away: its images are not run
                f.cancel()

    def call(self, job: Callable[[], Any]) -> Future:
        """Run `job` on the model thread, between batches."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                raise Full("the server is stopping")
            self.jobs.append((job, future, time.monotonic()))
            self.cond.notify_all()
        return future

    @property
    def waiting(self) -> int:
        return len(self.items)

    def stop(self) -> None:
        """Finish what is queued, then end the model thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()

    def loop(self) -> None:
        if self.threads:
            set_thread_threads(self.threads)  # (per thread with OpenMP: set where the model runs)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.items or self.jobs or self.stopping)
                if self.jobs and (not self.items or self.jobs[0][2] <= self.items[0].arrived):
                    job, future, _ = self.jobs.popleft()  # (in turn with the images: neither starves the other)
                    batch = None
                elif self.items:
                    batch = self.take()
                else:
                    return
            if batch is None:
                with self.running():  # (an explanation runs the model on every core too)
                    run(job, future)
            elif batch:
                self.run_batch(batch)

    def take(self) -> list[Item]:
        """The next batch (the condition held): the oldest images, once the batch is full, or the oldest has
        waited max_wait_s and no image being decoded has been waited for join_wait_s; cancelled ones dropped."""
        deadline = self.items[0].arrived + self.max_wait_s
        joining = time.monotonic() + self.join_wait_s
        while len(self.items) < self.max_batch and not self.stopping and not self.jobs:
            left = max(deadline, joining if self.coming else 0) - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)
        batch = [self.items.popleft() for _ in range(min(self.max_batch, len(self.items)))]
        return [it for it in batch if it.future.set_running_or_notify_cancel()]

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The model thread at work: decoding waits meanwhile where `exclusive`, whatever the work raises."""
        self.between.clear()
        try:
            yield
        finally:
            self.between.set()

    def run_batch(self, batch: list[Item]) -> None:
        start = time.perf_counter()
        try:
            with self.running():
                out = self.model(torch.stack([it.image for it in batch]))
        except Exception as e:  # a bug or the device's failure: each request is told, the thread goes on
            for it in batch:
                it.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        self.batches += 1
        self.images += len(batch)
        for it, row in zip(batch, out):
            it.future.set_result(row)
        if self.observe is not None:
            try:
                self.observe(len(batch), seconds)
            except Exception:  # (the metrics' files on a full disk): the answers and the thread go on
                log.exception("could not record a batch in the metrics")


def run(job: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(job())
    except Exception as e:
        future.set_exception(e)
