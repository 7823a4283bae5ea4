"""What the serve.py tests share: a real server in its own process on a free loopback port, HTTP requests
to it, multipart bodies, and hostile files."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

for name in ("starlette", "uvicorn", "python_multipart", "prometheus_client"):
    pytest.importorskip(name, reason="serve.py's libraries are not installed: pip install -r requirements-serve.txt")


class Server:
    """`python serve.py --port 0 ARGS` until stopped; `url` once it serves; everything it printed in `output`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--log-level", "warning", *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.output: list[str] = []
        found = threading.Event()

        def drain() -> None:  # read all along: a full pipe would stall the server
            for line in self.proc.stdout:
                self.output.append(line)
                if re.search(r" at http://\S+:\d+/", line):
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        found.wait(180)
        started = [m for line in self.output if (m := re.search(r" at http://(\S+):(\d+)/", line))]
        if not started:
            self.proc.kill()
            raise AssertionError("serve.py did not start:\n" + "".join(self.output))
        self.host, self.port = started[0][1], int(started[0][2])
        self.url = f"http://{self.host}:{self.port}/"
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("serve.py does not answer /health:\n" + "".join(self.output))

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def post(self, path: str, files: list[tuple[str, bytes]], headers: dict[str, str] | None = None
             ) -> tuple[int, Any]:
        body, kind = multipart(files)
        status, _, data = self.request("POST", path, body, {"Content-Type": kind, **(headers or {})})
        return status, json.loads(data)

    def rss_mb(self) -> float:
        """The resident memory of the server and its worker processes together (Linux's /proc), in MB."""
        pids = [self.proc.pid, *map(int, subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                                       text=True).stdout.split())]
        status = [Path(f"/proc/{pid}/status").read_text() for pid in pids]
        return sum(int(m[1]) for text in status if (m := re.search(r"VmRSS:\s+(\d+) kB", text))) / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


BOUNDARY = "imgcls-test-boundary-7d1f"


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with each (file name, bytes) as a `file` field."""
    out = io.BytesIO()
    for name, data in files:
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels: a decompression bomb to anything that
    decodes before checking."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * (1 + width * 3) * 4)  # a few rows of the claimed width; the rest missing
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def read_file(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def without_fast_http(folder: Path) -> dict[str, str]:
    """The environment in which uvicorn finds neither uvloop nor httptools (modules of those names in `folder`
    that fail to import): it then runs asyncio's loop and h11, as where they are not installed."""
    for name in ("uvloop", "httptools"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} hidden')\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
