"""What a server runs with, read once from serve.py's command line and handed to every worker process as
JSON in the environment (uvicorn starts each worker afresh). No torch here: serve.py checks a command line
before torch loads."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from imgcls.errors import UsageError

ENV = "IMGCLS_SERVE_SETTINGS"  # the settings, for the worker processes
KEY_ENV = "IMGCLS_API_KEY"  # the API key: given here rather than on the command line, where `ps` shows it
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's folder of counts, shared by the workers
METRIC_FILE = re.compile(r"(counter|gauge_[a-z]+|histogram|summary)_\d+\.db")  # prometheus_client's names there

# The largest batch tried when the server times its model at start (model.Served.time_model), and
# the longest wait for a batch to fill: chosen by measurement (bench/bench_serve.py --sweep, docs/serving.md).
# Under load a batch fills while the one before it runs, so a wait adds nothing there beyond the noise
# (ResNet18, batches of 8, 16 clients: 92, 88, 95, 99, 87 img/s at 0, 1, 2, 10, 25 ms; 4 clients: 83, 81, 82, 75,
# 56) and costs a lone request all of it (1 client: 59, 55, 52, 38, 24 img/s). Batches of up to 16 did best at 16
# clients (89, 99, 105, 99 img/s for 4, 8, 16, 32). Triton's dynamic batcher does not wait by default either.
MAX_BATCH = {"cpu": 16, "gpu": 64}
MAX_WAIT_MS = 0.0
MAX_IMAGES = 64  # per request: more is several requests (the page sends one image per request)


@dataclass
class Settings:
    """The server's options, as serve.py --help describes them."""
    checkpoint: str
    device: str = "auto"
    amp: bool = False
    topk: int = 3
    reject_below: float | None = None
    tta: bool = False
    max_batch: int | None = None  # None: timed at start (model.Served.time_model)
    max_wait_ms: float = MAX_WAIT_MS
    max_queue: int = 256  # images waiting for the model; beyond it requests are turned away (503)
    threads: int | None = None  # the model's threads per worker; None: the machine's cores shared by the workers
    workers: int = 1
    max_file_mb: float = 32.0
    max_request_mb: float = 64.0
    timeout_s: float = 30.0
    max_images: int = MAX_IMAGES
    needs_key: bool = False  # the key itself travels in KEY_ENV, never in these settings
    overlap_decoding: bool = False  # decode while a batch runs even when the model has every core

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> Settings:
        values = json.loads(os.environ[ENV])
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @property
    def max_in_flight(self) -> int:
        """Requests answered at once; more are turned away by the app (JSON 503, Retry-After)."""
        return 4 * self.max_queue

    @property
    def largest_batch(self) -> int:
        """The most images a batch can hold: those of the queue, or of one request taken into an empty one
        (batcher.Batcher.submit)."""
        return max(self.max_queue, self.max_images)

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


def cpus() -> int:
    """The cores this process may use (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(settings: Settings) -> int:
    return settings.threads or max(1, cpus() // settings.workers)


def metrics_folder() -> Path | None:
    """The folder of GET /metrics' counts given in PROMETHEUS_MULTIPROC_DIR, made ready before the model loads
    and before prometheus_client is imported (it reads the variable then). Set but empty, as a container's
    environment may leave it, it is taken as not set: prometheus_client would count in files of the current
    folder. One it cannot use is said in one line: it would fail at its first count, in every worker, which
    uvicorn starts again without end; another program's *.db there would fail every scrape. Files of an
    earlier server are removed: their counts are not this one's (and their names, by process id, come again
    at each start of a container)."""
    given = os.environ.get(MULTIPROCESS_ENV)
    if not given:
        os.environ.pop(MULTIPROCESS_ENV, None)
        return None
    folder = Path(given)
    if not folder.exists():
        raise UsageError(f"{MULTIPROCESS_ENV} {folder} does not exist: make the folder, or unset the variable (the "
                         "server then makes one of its own)")
    if not folder.is_dir():
        raise UsageError(f"{MULTIPROCESS_ENV} {folder} is not a folder: give a folder for the metrics' files")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{MULTIPROCESS_ENV} {folder} is not writable: give a folder the server may write in")
    others = sorted(p.name for p in folder.glob("*.db") if not METRIC_FILE.fullmatch(p.name))
    if others:
        raise UsageError(f"{MULTIPROCESS_ENV} {folder} holds files that are not prometheus_client's "
                         f"({', '.join(others[:3])}): give the metrics a folder of their own")
    for p in folder.glob("*.db"):
        p.unlink(missing_ok=True)
    return folder
