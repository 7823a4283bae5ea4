"""Serve a trained model over HTTP: an API for programs and a page for people (drop images, see labels).

    python serve.py --checkpoint runs/NAME                  # http://127.0.0.1:8000/ (the page), /predict, ...
    python serve.py --checkpoint model.onnx --port 9000     # an exported model, with ONNX Runtime
    IMGCLS_API_KEY=secret python serve.py --host 0.0.0.0 --workers 2   # on the network: a key is required

    curl -F file=@cat.jpg http://127.0.0.1:8000/predict     # {"results": [{"label": "cat", ...}]}

POST /predict: images as multipart/form-data files or the raw body; JSON answers per image, as test.py's
(top-k labels and calibrated probabilities, "unknown" below --reject-below, a multi-label model's labels
above their thresholds). POST /explain: a heat map (PNG) of the evidence for one image's label. GET /model:
the classes, input size, calibration and provenance. GET /health. Requests that arrive together are batched.
Uploads are checked as training checks files, in memory; a bad one gets a 4xx JSON error naming the problem.
SIGTERM (Ctrl-C) stops taking requests and finishes those in flight. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from pathlib import Path

from imgcls import runfolder
from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
from imgcls.errors import UsageError
from imgcls.serving.settings import KEY_ENV, MAX_BATCH, MAX_IMAGES, MAX_WAIT_MS, Settings, metrics_folder

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="serve.py")
    add_shared(parser, "checkpoint", "device", "amp")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on: loopback (this machine "
                        "only) unless told otherwise, e.g. 0.0.0.0 for every interface (then a key is required)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one, printed)")
    parser.add_argument("--api-key", help=f"the key every request but / and /health must carry (Authorization: "
                        f"Bearer KEY or X-API-Key: KEY); default: ${KEY_ENV}, which `ps` does not show")
    parser.add_argument("--allow-no-key", action="store_true", help="serve on a non-loopback --host without a key "
                        "(when a proxy in front of it checks who calls)")
    parser.add_argument("--topk", type=int, default=3, help="labels per image in each answer (a request may ask "
                        "for another number: ?topk=K)")
    parser.add_argument("--reject-below", type=float, metavar="P", help="answer 'unknown' when an image's top "
                        "probability is below P, as test.py does (0-1; a request may give ?reject_below=P)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation, as test.py --tta (several views "
                        "per image: slower)")
    parser.add_argument("--workers", type=int, default=1, help="server processes on this machine, each with its own "
                        "copy of the model, sharing the port and the cores")
    parser.add_argument("--threads", type=int, help="the model's threads per worker (default: the cores shared by "
                        "the workers)")
    parser.add_argument("--max-batch", type=int, help=f"most images per batch through the model; 1: no batching "
                        "(default: timed at start: the largest size within 10%% of the fastest, up to "
                        f"{MAX_BATCH['cpu']} on a CPU, {MAX_BATCH['gpu']} on a GPU)")
    parser.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS, help="longest wait of an image for others "
                        f"to arrive and batch it with (ms; default {MAX_WAIT_MS:g}: none, under load a batch fills "
                        "while the one before it runs); images already being decoded are waited for regardless, up to "
                        "the model's time for a batch (of one, or a full one where decoding waits for batches)")
    parser.add_argument("--overlap-decoding", action="store_true", help="decode uploads while a batch runs even when "
                        "the model has every core (default: there a decode starts between batches, as a decoding "
                        "thread that takes a core from one of the model's threads holds up all of them; on a GPU, a "
                        "model on one thread, or with --threads leaving cores free, decoding always overlaps)")
    parser.add_argument("--max-queue", type=int, default=256, help="most images waiting for the model; more are "
                        "turned away with 503 and Retry-After")
    parser.add_argument("--max-file-mb", type=float, default=32.0, help="larger uploaded files are refused (413), "
                        "as training skips larger files")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="larger requests are refused (413) "
                        "before they are read")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, help="most images in one request")
    parser.add_argument("--timeout", type=float, default=30.0, help="most seconds a request may take, upload "
                        "included (408 for a slow upload, 503 for a server too busy to answer in time)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="how much the server logs (info: "
                        "a line per request)")
    args = parser.parse_args(argv)
    check_shared(args)
    check_numbers(args)
    given = args.api_key
    args.api_key = given or os.environ.get(KEY_ENV) or None
    check_key(args.api_key, "--api-key" if given else KEY_ENV)
    check_exposure(args.host, args.api_key, args.allow_no_key)
    return args


def check_numbers(args: argparse.Namespace) -> None:
    rules = [(0 <= args.port <= 65535, "--port must be from 0 to 65535 (0: any free port)"),
             (args.topk >= 1, "--topk must be at least 1"),
             (args.reject_below is None or 0 <= args.reject_below <= 1,
              f"--reject-below {args.reject_below!r} is not a probability: give a number from 0 to 1, e.g. 0.8"),
             (args.workers >= 1, "--workers must be at least 1"),
             (args.threads is None or args.threads >= 1, "--threads must be at least 1"),
             (args.max_batch is None or args.max_batch >= 1, "--max-batch must be at least 1 (1: no batching)"),
             (0 <= args.max_wait_ms <= 10_000, "--max-wait-ms must be from 0 to 10000"),
             (args.max_queue >= 1 and args.max_images >= 1, "--max-queue and --max-images must be at least 1"),
             (0 < args.max_file_mb < math.inf and 0 < args.max_request_mb < math.inf,
              "--max-file-mb and --max-request-mb must be positive numbers (MB)"),
             (0 < args.timeout < math.inf, "--timeout must be a positive number of seconds")]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)


def check_key(key: str | None, source: str) -> None:
    """A key every client can send as it is: HTTP headers are Latin-1 with their ends' spaces stripped, so
    a key with other characters (UTF-8 from curl, refused by browsers) or spaces could never match."""
    if key is not None and not all("!" <= c <= "~" for c in key):
        raise UsageError(f"the API key ({source}) must be printable ASCII without spaces (letters, digits, "
                         "punctuation), as HTTP headers carry it: e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'")


def check_exposure(host: str, key: str | None, allowed: bool) -> None:
    """Loopback is this machine only; any other address serves the network, which needs a key (or a proxy
    in front that checks callers: --allow-no-key)."""
    if key is None and not allowed and not is_loopback(host):
        raise UsageError(f"--host {host} serves the network: require a key (--api-key KEY, or set {KEY_ENV}), or give "
                         "--allow-no-key when a proxy in front of the server checks who calls")


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host} is not an address of this machine: give an IP address or a name, e.g. "
                         "127.0.0.1 or 0.0.0.0") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow starts: a port in use is said at once."""
    family = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0][0]
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}): give another --port (or stop what "
                         "uses it)") from None
    sock.set_inheritable(True)  # (the worker processes take it over)
    return sock


def settings_of(args: argparse.Namespace, ckpt: Path) -> Settings:
    return Settings(str(ckpt), args.device, args.amp, args.topk, args.reject_below, args.tta, args.max_batch,
                    args.max_wait_ms, args.max_queue, args.threads, args.workers, args.max_file_mb,
                    args.max_request_mb, args.timeout, args.max_images, args.api_key is not None,
                    overlap_decoding=args.overlap_decoding)


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    ckpt = runfolder.runnable(runfolder.find(args.checkpoint))
    sock = listen(args.host, args.port)
    metrics_folder()  # (before prometheus_client is imported: it reads the folder's variable then)
    try:  # the optional requirements, said plainly when missing
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve.py needs its web libraries: pip install -r requirements-serve.txt") from None
    from imgcls.serving import run  # torch loads only for a command line that is good
    imports_done()

    return run.serve(settings_of(args, ckpt), args.api_key, sock, args.log_level)


if __name__ == "__main__":
    script(main, __file__)
