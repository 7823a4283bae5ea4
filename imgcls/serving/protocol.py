"""HTTP/1.1 as uvicorn speaks it with httptools, with limits on a request's head, which the app never sees
(it starts once the head has arrived): httptools keeps a head whole in memory however long it grows (h11
stopped at 16 KB; a 400 MB header took this server 1.2 GB), and uvicorn gives a head no time limit (a client
that sends it a byte at a time, or connects and sends nothing, held its connection for good: enough of
them and uvicorn turns everyone else away). What uvicorn answers itself is JSON here too, as every error of
the API is (a request that is not HTTP was plain text).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 16 * 1024  # the request line and headers: h11's limit, what uvicorn kept to before httptools
SLICE = 4096  # bytes fed to the parser at a time while a head arrives: a head is counted to within this


class BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a head refused past MAX_HEAD_BYTES (431) or `head_timeout_s`
    (408; a connection that sent nothing is closed), both answered as JSON, and an answer for a client that
    half-closes after its request."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.reading_head = True
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.half_closed = False  # the client ended its sending side while its request was being answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """While a head arrives, the bytes go to the parser a slice at a time, so that the head is counted
        apart from the body behind it in the same read."""
        view = memoryview(data)
        while view and self.reading_head and not self.transport.is_closing():
            piece, view = view[:SLICE], view[SLICE:]
            self.head_bytes += len(piece)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.refuse(431, f"the request's headers are over {MAX_HEAD_BYTES // 1024} KB: send fewer or "
                                 "shorter headers (and a shorter URL)")
                return
            super().data_received(piece)  # type: ignore[arg-type]
        if view and not self.transport.is_closing():
            super().data_received(view)  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self.stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.await_head()  # (the next request's, on a kept-alive connection)

    def eof_received(self) -> bool | None:
        """A client that ends its sending side after its request (`nc -N`, some HTTP/1.0 clients) still gets
        its answer: the connection stays open for it, then closes. (uvicorn's own let asyncio close it at once,
        and the answer was lost.) One that ends it in the middle of its upload is closed, as before."""
        if self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete:
            self.half_closed = True
            return True
        return None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.half_closed and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, f"not a valid HTTP/1.1 request ({msg.rstrip('.').lower()})")

    def await_head(self) -> None:
        self.reading_head, self.head_bytes = True, 0
        self.stop_head_timer()
        self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_too_slow)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_slow(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.reading_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:  # the last request is still being answered
            self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_too_slow)
        elif self.head_bytes == 0:
            self.transport.close()  # nothing asked: nothing to answer
        else:
            self.refuse(408, f"the request's headers took over {self.head_timeout_s:g} s to arrive (serve.py "
                             "--timeout): send it again")

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error and close the connection (what is left of the request unread)."""
        self.logger.warning("%s %s", status, message)
        body = json.dumps({"error": message}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
