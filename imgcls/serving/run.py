"""serve.py's work once its command line is good: the model loaded (a bad file said in one line, before
the server starts), then uvicorn on the socket serve.py bound, in this process or in --workers processes
that each load their own copy of the model (the server keeps no state: any of them answers any request).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import uvicorn
from uvicorn.supervisors import Multiprocess

from imgcls.serving.app import make_app
from imgcls.serving.model import Served
from imgcls.serving.settings import ENV, KEY_ENV, MULTIPROCESS_ENV, Settings, cpus

try:  # httptools (requirements-serve.txt), with limits on a request's head
    from imgcls.serving.protocol import BoundedHead
except ImportError:  # without it, uvicorn's h11: a head of 16 KB at most, but in no time limit
    BoundedHead = None  # type: ignore[assignment,misc]

GRACE_S = 5  # past --timeout, for requests in flight at SIGTERM to finish
# uvicorn's own limit (connections, open or busy) stays above the app's on requests (Settings.max_in_flight),
# which answers as the API does: uvicorn's 503 is plain text with no Retry-After. Idle keep-alive
# connections from a load balancer count in uvicorn's.
SPARE_CONNECTIONS = 1024


def serve(settings: Settings, key: str | None, sock: socket.socket, log_level: str = "info") -> int:
    served = Served(settings)  # in this process too with --workers: a file that does not load is said here
    app = make_app(served, key) if settings.workers == 1 else None  # (times the batch size when not given)
    host, port = sock.getsockname()[:2]
    batches = f"batches of up to {served.max_batch}" if served.max_batch else "batch size timed by each worker"
    print(f"serving {served.loaded.arch} ({len(served.loaded.classes)} classes, {served.loaded.device}, {batches}, "
          f"{served.threads} threads x {settings.workers} worker(s) of {cpus()} cores) at "
          f"http://{host if ':' not in host else f'[{host}]'}:{port}/" + (" (API key required)" if key else ""),
          flush=True)
    options = {"log_level": log_level, "timeout_graceful_shutdown": int(settings.timeout_s + GRACE_S),
               "limit_concurrency": settings.max_in_flight + SPARE_CONNECTIONS, "server_header": False,
               "http": functools.partial(BoundedHead, head_timeout_s=settings.timeout_s) if BoundedHead else "h11"}
    if app is not None:
        uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
        return 0
    del served
    gc.collect()
    os.environ[ENV] = settings.to_env()  # what each worker reads (imgcls.serving.app.from_environment)
    if key:
        os.environ[KEY_ENV] = key
    config = uvicorn.Config("imgcls.serving.app:from_environment", factory=True, workers=settings.workers, **options)
    with shared_metrics():
        Multiprocess(config, sockets=[sock]).run()
    return 0


@contextlib.contextmanager
def shared_metrics() -> Iterator[None]:
    """A folder where the workers count GET /metrics' figures (metrics.py), removed at the end; one given in
    PROMETHEUS_MULTIPROC_DIR is kept (serve.py emptied it of earlier counts: settings.metrics_folder)."""
    if os.environ.get(MULTIPROCESS_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="imgcls-serve-metrics-")
    os.environ[MULTIPROCESS_ENV] = folder
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_ENV]
        shutil.rmtree(folder, ignore_errors=True)
