"""GET /metrics: what the server has done, in Prometheus's text format (prometheus_client), for the dashboards
and alerts a team already runs: requests by endpoint and status with their latency, images answered and
refused, and the batches the model ran (their sizes and times).

With --workers N each worker counts its own, and any of them may answer a scrape: the counts then go through
files in a folder of the supervisor's (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR; made by
run.py and removed at exit), so that every scrape sums all the workers. Nothing from an upload goes there.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from imgcls.serving.settings import MULTIPROCESS_ENV

log = logging.getLogger("imgcls.serve")
F = TypeVar("F", bound=Callable[..., Any])


def never_failing(record: F) -> F:
    """A count that cannot be kept (the folder's files on a full disk) is logged, once per kind, and the request
    answered all the same: the metrics are worth less than the answers."""
    failed = False

    @functools.wraps(record)
    def safely(*args: Any) -> None:
        nonlocal failed
        try:
            record(*args)
        except Exception:
            if not failed:
                failed = True
                log.exception("could not record %s in the metrics (said once)", record.__name__)
    return safely  # type: ignore[return-value]


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One server's metrics. Each has a registry of its own (several servers in one process, as in tests, do
    not collide), or none in multiprocess mode, where the values go to the folder's files."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.requests = Counter("imgcls_serve_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("imgcls_serve_request_seconds", "Time to answer a request, by endpoint",
                                 ["endpoint"], buckets=SECONDS, registry=registry)
        self.images = Counter("imgcls_serve_images", "Images sent to POST /predict: answered (ok) or refused (bad: "
                              "not an image, too large, broken)", ["outcome"], registry=registry)
        self.batch_images = Histogram("imgcls_serve_batch_images", "Images per batch the model ran",
                                      buckets=BATCH_SIZES, registry=registry)
        self.batch_seconds = Histogram("imgcls_serve_batch_seconds", "The model's time per batch", buckets=SECONDS,
                                       registry=registry)

    @never_failing
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    @never_failing
    def answered(self, ok: int, bad: int) -> None:
        if ok:
            self.images.labels("ok").inc(ok)
        if bad:
            self.images.labels("bad").inc(bad)

    @never_failing
    def batch(self, images: int, seconds: float) -> None:
        """(Called on the model thread: prometheus_client's metrics are thread-safe.)"""
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
