"""The ASGI app (Starlette): POST /predict, POST /explain, GET /model, GET /health, GET /metrics, and the page
at /.

Every answer is JSON (an explanation: a PNG), every error too: {"error": "..."} with a 4xx status for what
the client can fix (a bad upload, a wrong key, a bad parameter), 503 with Retry-After when the server is
too busy or stopping, never a 500 for anything an upload holds. A request's images are decoded in a pool
of threads while the model thread runs batches (batcher.py), each request within --timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgcls.machine import release_freed_memory, set_thread_threads
from imgcls.serving.batcher import Batcher, Full
from imgcls.serving.metrics import Metrics
from imgcls.serving.model import Served
from imgcls.serving.settings import KEY_ENV, Settings
from imgcls.serving.uploads import BadUpload, Upload, decode, read_body, uploads

log = logging.getLogger("imgcls.serve")
PAGE = resources.files("imgcls.serving") / "page"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# the page runs its own script and style only, and loads images only from itself (and the files dropped on it)
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
RETRY_AFTER_S = "1"
RELEASE_AFTER_S = 1.0  # idle (no request being answered) this long, a worker gives its freed memory back


class Server:
    """The model, its batcher and the decoding threads of one worker process."""

    def __init__(self, served: Served, key: str | None):
        self.served, self.settings, self.key = served, served.settings, key
        self.batcher = Batcher(served.logits, served.max_batch or 1, served.settings.max_wait_ms / 1000,
                               served.settings.max_queue, served.torch_threads)
        self.batcher.call(served.time_model).result()  # (on the model thread, as it will run)
        release_freed_memory()  # the timing's full batches: kept otherwise until a request had been answered
        self.batcher.max_batch, self.batcher.join_wait_s = served.max_batch, served.join_wait_s
        self.batcher.exclusive = served.decode_between_batches
        self.metrics = Metrics()
        self.batcher.observe = self.metrics.batch  # (from now: the timing's batches are not the clients')
        self.decoding_threads = max(2, served.threads)
        self.decoders = ThreadPoolExecutor(self.decoding_threads, thread_name_prefix="decode",
                                           initializer=set_thread_threads, initargs=(1,))  # (parallel: model only)
        self.in_flight = 0  # requests being answered (on the event loop's thread only)
        self.release: asyncio.TimerHandle | None = None  # the memory's release, once idle

    def started(self) -> None:
        self.in_flight += 1
        if self.release is not None:
            self.release.cancel()
            self.release = None

    def finished(self) -> None:
        """A request answered. Once none has been for RELEASE_AFTER_S, the memory freed meanwhile (uploads,
        decoded images, activations: kept for the next request, machine.tune_cpu_allocator) goes back to the
        system, in a decoding thread: under load it is reused, and an idle server holds no burst's peak."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self.release = asyncio.get_running_loop().call_later(RELEASE_AFTER_S, self.release_memory)

    def release_memory(self) -> None:
        with contextlib.suppress(RuntimeError):  # (the decoding threads have stopped: the server is ending)
            self.decoders.submit(release_freed_memory)

    def close(self) -> None:
        self.batcher.stop()
        self.decoders.shutdown()

    async def uploads(self, request: Request) -> list[Upload]:
        s = self.settings
        body = await read_body(request, s.max_request_bytes)
        request.state.received = True
        return uploads(body, request.headers.get("content-type", ""), request.query_params.get("name", "image"),
                       s.max_images)

    async def images(self, request: Request) -> tuple[list[Upload], list[Any]]:
        """The request's uploads, and each one decoded (a tensor) or its BadUpload."""
        files = await self.uploads(request)
        return files, await self.decode(files)

    def decode_one(self, upload: Upload) -> Any:
        """In a decoding thread: the upload as the model takes it (a tensor), between batches where the model
        has every core (batcher.py)."""
        self.batcher.wait_between_batches()
        return decode(upload, self.served.loaded.preprocess, self.settings.max_bytes)

    async def decode(self, files: list[Upload]) -> list[Any]:
        """Each upload decoded (a tensor), or its BadUpload. A request has at most one decode per decoding thread
        in the pool's queue at a time, so that one of many slow files (a 36-megapixel PNG of 120 KB decodes in
        ~0.3 s) cannot queue them all ahead of every later request; the rest, not yet queued, are dropped if the
        request ends (timed out, or its client gone)."""
        loop = asyncio.get_running_loop()
        share = asyncio.Semaphore(self.decoding_threads)

        async def one(f: Upload) -> Any:
            async with share:
                return await loop.run_in_executor(self.decoders, self.decode_one, f)

        decoded = await asyncio.gather(*(one(f) for f in files), return_exceptions=True)
        for d in decoded:
            if isinstance(d, BaseException) and not isinstance(d, BadUpload):
                raise d  # a bug: not the upload's fault
        return decoded


def make_app(served: Served, key: str | None = None) -> Starlette:
    """The app for a loaded model; `key`, when given, is required by every endpoint but / and /health."""
    server = Server(served, key)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:  # (after uvicorn has finished the requests in flight)
            await asyncio.get_running_loop().run_in_executor(None, server.close)

    routes = [Route("/predict", guarded(server, predict), methods=["POST"]),
              Route("/explain", guarded(server, explain), methods=["POST"]),
              Route("/model", guarded(server, model_info), methods=["GET"]),
              Route("/health", lambda r: health(server), methods=["GET"]),
              Route("/metrics", guarded(server, metrics), methods=["GET"]),
              Route("/", page, methods=["GET"]),
              Route("/page/{name}", page_file, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_allowed})
    app.state.server = server
    return app


def from_environment() -> Starlette:
    """The app of a worker process started by uvicorn (serve.py --workers N): settings from the environment."""
    settings = Settings.from_env()
    return make_app(Served(settings), os.environ.get(KEY_ENV) or None)


Handler = Callable[[Server, Request], Awaitable[Response]]


def guarded(server: Server, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The handler behind the API key (when one is set) and the time limit, its errors answered as JSON; each
    answer counted in the metrics."""
    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        response = await answer(request)
        server.metrics.request(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    async def answer(request: Request) -> Response:
        if server.key is not None and not authorised(request, server.key):
            return error(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                         {"WWW-Authenticate": "Bearer"})
        if server.in_flight >= server.settings.max_in_flight:
            return error(503, f"busy: {server.in_flight} requests are being answered (4 x serve.py --max-queue); "
                              "retry shortly", {"Retry-After": RETRY_AFTER_S})
        server.started()
        try:
            async with asyncio.timeout(server.settings.timeout_s):
                return await handler(server, request)
        except BadUpload as e:
            return error(e.status, str(e))
        except Full as e:
            return error(503, f"busy: {e}; retry shortly", {"Retry-After": RETRY_AFTER_S})
        except TimeoutError:
            if not getattr(request.state, "received", False):
                return error(408, f"the upload took over {server.settings.timeout_s:g} s to arrive (serve.py "
                                  "--timeout): send it again")
            return error(503, f"not answered within {server.settings.timeout_s:g} s (serve.py --timeout): the server "
                              "is overloaded; retry shortly", {"Retry-After": RETRY_AFTER_S})
        except Exception:  # a bug, or the device failing: logged with its traceback, the server goes on
            log.exception("error answering %s %s", request.method, request.url.path)
            return error(500, "internal error (see the server's log)")
        finally:
            server.finished()
    return endpoint


def authorised(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key") or ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = given or token.strip()
    return hmac.compare_digest(given.encode(), key.encode())


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def query(request: Request, name: str, kind: type, default: Any, ok: Callable[[Any], bool], rule: str) -> Any:
    """A query parameter, checked: a bad one is a 400 that says what it must be."""
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise BadUpload(400, f"{name}={text!r}: {rule}")
    return value


async def predict(server: Server, request: Request) -> Response:
    """The answers for each image of the request, in order. A request none of whose images can be used is
    answered with the first one's status; otherwise 200, an unusable image's entry saying why."""
    s, served = server.settings, server.served
    topk = query(request, "topk", int, s.topk, lambda k: k >= 1, "give a whole number of labels, 1 or more")
    reject = query(request, "reject_below", float, s.reject_below,
                   lambda p: 0 <= p <= 1 and not served.loaded.multilabel,
                   "give a probability from 0 to 1 (not for a multi-label model: each label has its threshold)")
    files = await server.uploads(request)
    with server.batcher.expecting(len(files)):  # (a batch about to run may wait for them)
        decoded = await server.decode(files)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
        if not good:
            server.metrics.answered(0, len(files))
            first = decoded[0]
            return JSONResponse({"error": f"{files[0].name}: {first}", "results": [bad(f, d) for f, d in
                                                                                      zip(files, decoded)]},
                                first.status)
        futures = server.batcher.submit([decoded[i] for i in good])
    logits = await server.batcher.results(futures)
    server.metrics.answered(len(good), len(files) - len(good))  # (not before: a full queue or the time limit is a 503)
    answers = iter(served.answers(torch.stack(logits), topk, reject))
    results = [{"file": f.name, **next(answers)} if i in good else bad(f, d)
               for i, (f, d) in enumerate(zip(files, decoded))]
    return JSONResponse({"model": served.loaded.arch, "results": results})


def bad(upload: Upload, problem: BadUpload) -> dict[str, Any]:
    return {"file": upload.name, "status": "error", "error": str(problem), "code": problem.status}


async def explain(server: Server, request: Request) -> Response:
    """A heat map (PNG, the size the model sees) of the evidence in one image for its predicted class, or for
    ?label=NAME; the class, the method and whether any evidence was found in X- headers."""
    served = server.served
    label = request.query_params.get("label")
    if label is not None and label not in served.loaded.classes:
        raise BadUpload(400, f"label={label!r} is not one of the model's classes (GET /model lists them)")
    files, decoded = await server.images(request)
    if len(files) != 1:
        raise BadUpload(400, f"explain one image at a time ({len(files)} were sent)")
    if isinstance(decoded[0], BadUpload):
        raise BadUpload(decoded[0].status, f"{files[0].name}: {decoded[0]}")
    png, cls, method, found = await asyncio.wrap_future(server.batcher.call(lambda: served.explain(decoded[0], label)))
    return Response(png, media_type="image/png", headers={"X-Label": ascii_header(cls), "X-Method": method,
                                                            "X-Evidence-Found": str(found).lower()})


def ascii_header(text: str) -> str:
    """A class name in an HTTP header (latin-1 only): non-ASCII characters escaped as JSON escapes them."""
    return text.encode("ascii", "backslashreplace").decode().replace("\\x", "\\u00")


async def metrics(server: Server, _: Request) -> Response:
    text, content_type = server.metrics.exposition()
    return Response(text, media_type=content_type)


async def model_info(server: Server, _: Request) -> Response:
    return JSONResponse(server.served.info())


def health(server: Server) -> Response:
    b = server.batcher
    return JSONResponse({"status": "ok", "model": server.served.loaded.arch, "waiting": b.waiting,
                         "served": {"images": b.images, "batches": b.batches}})


async def page(_: Request) -> Response:
    return Response((PAGE / "index.html").read_bytes(), media_type="text/html",
                    headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})


async def page_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in PAGE_FILES:
        return error(404, f"no page file {name!r}")
    return Response((PAGE / name).read_bytes(), media_type=PAGE_FILES[name], headers={"X-Content-Type-Options":
                                                                                       "nosniff"})


async def not_found(request: Request, _: Exception) -> Response:
    return error(404, f"no such endpoint: {request.url.path} (POST /predict, POST /explain, GET /model, GET /health, "
                      "GET /metrics)")


async def not_allowed(request: Request, _: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}")
