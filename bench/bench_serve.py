"""serve.py under load: img/s and latency per number of concurrent clients, batched against unbatched, and
against the model's own offline batch throughput (the ceiling); then a load with 10% bad uploads.

    python bench/bench_serve.py                         # ResNet18 and MobileNetV2 at 224 px; a Markdown table
    python bench/bench_serve.py --quick                 # shorter, clients 1 and 16 only
    python bench/bench_serve.py --sweep                 # ResNet18 at 1, 4, 16 clients: --max-batch, --max-wait-ms
    python bench/bench_serve.py --stack                 # 16 clients: HTTP stack, OpenMP waiting, when to decode

Each model is a freshly initialised 10-class checkpoint (speed does not depend on training). The server runs
on loopback in its own process; N client threads each send one real photo per request (scikit-image's, as
JPEGs of 300-600 px: decoding and resizing are part of every request) over a kept-alive connection, for a
fixed time. Unbatched is the same server with --max-batch 1. The ceiling is the model alone, in this process,
on batches of already decoded images with every core, at its best batch size (of 1, 4, 16). Clients share the
machine with the server: on a small CPU the figures are a floor.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from serving import Server, png_claiming, without_fast_http  # noqa: E402

from imgcls import checkpoint  # noqa: E402
from imgcls.evaluation.predictor import load_model  # noqa: E402
from imgcls.networks import build as networks  # noqa: E402
from imgcls.serving.settings import cpus  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")


def photos() -> list[bytes]:
    """Real photos as JPEGs, each also flipped and at a second size: 24 different files."""
    import skimage.data

    out = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        for img in (Image.fromarray(a), Image.fromarray(a[:, ::-1].copy())):
            for scale in (1.0, 0.75):
                buf = io.BytesIO()
                img.resize((int(img.width * scale), int(img.height * scale))).save(buf, "JPEG", quality=90)
                out.append(buf.getvalue())
    return out


def bad_uploads(good: bytes) -> list[tuple[str, bytes]]:
    return [("truncated", good[: len(good) // 3]), ("not an image", b"%PDF-1.4\n" + os.urandom(2000)),
            ("bomb", png_claiming(30_000, 30_000)), ("huge", b"\xff\xd8\xff" + os.urandom(1_300_000))]


def load(server: Server, clients: int, seconds: float, images: list[bytes], bad_every: int = 0) -> dict:
    """`clients` threads posting for `seconds`; every `bad_every`-th request of a client a bad upload. The
    latencies of good answers, the time taken and the statuses per kind of upload."""
    stop = time.monotonic() + seconds
    out: dict = {"latencies": [], "statuses": {}}
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        bad = bad_uploads(images[0])
        n = 0
        while time.monotonic() < stop:
            n += 1
            kind, body = ("good", images[(c * 7 + n) % len(images)])
            if bad_every and (n + c) % bad_every == 0:
                kind, body = bad[(c + n // bad_every) % len(bad)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                answer = json.loads(r.read())
                status = r.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
                status, answer = -1, {}
            took = time.perf_counter() - start
            with lock:
                out["statuses"].setdefault(kind, {}).setdefault(str(status), 0)
                out["statuses"][kind][str(status)] += 1
                if kind == "good" and status == 200 and answer["results"][0]["status"] == "ok":
                    out["latencies"].append(took)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.monotonic() - began
    return out


def max_batch(server: Server) -> int:
    """The batch size the server chose (timed at start) or was given."""
    return json.loads(server.request("GET", "/model")[2])["serving"]["max_batch"]


def summary(slices: list[dict], clients: int) -> dict:
    """Slices of one measurement taken in turn with the others, together: img/s and latency percentiles."""
    latencies = [t for s in slices for t in s["latencies"]]
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    statuses: dict = {}
    for s in slices:
        for kind, counts in s["statuses"].items():
            for status, n in counts.items():
                statuses.setdefault(kind, {}).setdefault(status, 0)
                statuses[kind][status] += n
    return {"clients": clients, "img_s": len(latencies) / sum(s["wall"] for s in slices),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "statuses": statuses}


class Ceiling:
    """The model alone: img/s on batches of decoded images, every core, as the server's model thread runs it, at
    each batch size in turn; the best is the ceiling (on a small CPU, large batches can be the slowest)."""

    def __init__(self, ckpt: Path, batches: tuple[int, ...], threads: int | None = None):
        torch.set_num_threads(threads or cpus())
        self.loaded = load_model(ckpt, "cpu")
        size = self.loaded.preprocess.img_size
        self.xs = [torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8) for b in batches]
        for x in self.xs:
            self.loaded(x)
        self.done = {b: [0, 0.0] for b in batches}

    def run(self, seconds: float) -> None:
        for x in self.xs:
            n, start = 0, time.monotonic()
            while time.monotonic() - start < seconds / len(self.xs):
                self.loaded(x)
                n += len(x)
            self.done[len(x)][0] += n
            self.done[len(x)][1] += time.monotonic() - start

    def best(self) -> tuple[float, int]:
        return max((n / t, b) for b, (n, t) in self.done.items())


def make_checkpoint(name: str, img_size: int, work: Path) -> Path:
    torch.manual_seed(0)
    path = work / f"{name}.pt"
    checkpoint.save(checkpoint.of_model(name, [f"class {i}" for i in range(10)], networks.build_model(name, 10)
                                        .state_dict(), networks.preprocessing(name, img_size)), path)
    return path


ROUNDS = 3  # each measurement in slices, taken in turn with the others: a machine whose load changes affects all


def bench_model(name: str, a: argparse.Namespace, images: list[bytes], work: Path) -> dict:
    ckpt = make_checkpoint(name, a.img_size, work)
    threads = ["--threads", str(a.threads)] if a.threads else []
    servers = {"batched": Server("--checkpoint", str(ckpt), "--max-file-mb", "1", *threads),
               "unbatched": Server("--checkpoint", str(ckpt), "--max-file-mb", "1", "--max-batch", "1", *threads)}
    ceiling = Ceiling(ckpt, tuple(a.ceiling_batches), a.threads)
    result: dict = {"model": name, "img_size": a.img_size, "batched": [], "unbatched": []}
    try:
        for server in servers.values():
            load(server, 4, 2, images)  # warm-up
        for n in a.clients:
            slices: dict[str, list[dict]] = {"batched": [], "unbatched": []}
            for _ in range(ROUNDS):
                for label, server in servers.items():
                    slices[label].append(load(server, n, a.seconds / ROUNDS, images))
                ceiling.run(a.seconds / ROUNDS / 2)
            for label in servers:
                r = summary(slices[label], n)
                result[label].append(r)
                print(f"  {name} {label:9} {n:3} clients: {r['img_s']:6.1f} img/s  p50 {r['p50_ms']:7.1f}  p95 "
                      f"{r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms", flush=True)
        result["ceiling_img_s"], result["ceiling_batch"] = ceiling.best()
        result["ceiling_by_batch"] = {b: n / t for b, (n, t) in ceiling.done.items()}
        print(f"  {name} the model alone: {result['ceiling_by_batch']} img/s by batch size", flush=True)
        result["bad_load"] = summary([load(servers["batched"], 16, a.seconds, images, bad_every=10)], 16)
        result["alive_after"] = servers["batched"].request("GET", "/health")[0] == 200
        print(f"  10% bad uploads at 16 clients: {result['bad_load']['statuses']}, alive after: "
              f"{result['alive_after']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return result


def table(results: list[dict]) -> str:
    """The Markdown table of docs/serving.md, from results made now or read back from the JSON (tests/test_docs.py
    checks the docs against it)."""
    lines = ["| model | clients | unbatched img/s | batched img/s | batched / unbatched | batched / ceiling | "
             "p50 / p95 / p99 ms (batched) | p99 ms (unbatched) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for b, u in zip(r["batched"], r["unbatched"]):
            lines.append(f"| {r['model']} | {b['clients']} | {u['img_s']:.1f} | {b['img_s']:.1f} | "
                         f"{b['img_s'] / u['img_s']:.2f}x | {b['img_s'] / r['ceiling_img_s']:.2f} | "
                         f"{b['p50_ms']:.0f} / {b['p95_ms']:.0f} / {b['p99_ms']:.0f} | {u['p99_ms']:.0f} |")
        one = {int(b): v for b, v in r["ceiling_by_batch"].items()}.get(1)  # what batching gains the model itself
        gain = f"; {r['ceiling_img_s'] / one:.2f}x its batch of 1" if one else ""
        lines.append(f"| {r['model']} | ceiling | | {r['ceiling_img_s']:.1f} (model alone, its best batch: "
                     f"{r['ceiling_batch']}{gain}) | | | | |")
    return "\n".join(lines)


def sweep(a: argparse.Namespace, images: list[bytes], work: Path) -> None:
    ckpt = make_checkpoint("resnet18", a.img_size, work)
    for batch, wait in ((4, 10), (8, 10), (16, 10), (32, 10), (8, 0), (8, 1), (8, 2), (8, 25)):
        server = Server("--checkpoint", str(ckpt), "--max-batch", str(batch), "--max-wait-ms", str(wait))
        try:
            load(server, 4, 2, images)
            for n in (1, 4, 16):
                r = summary([load(server, n, a.seconds, images)], n)
                print(f"--max-batch {batch:2} --max-wait-ms {wait:2}, {n:2} clients: {r['img_s']:6.1f} img/s, p50 "
                      f"{r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms", flush=True)
        finally:
            server.stop()


# The server's stack, each against the pure-Python HTTP parser and event loop: uvloop and httptools hidden from
# uvicorn by modules of those names that fail to import (it then takes h11 and asyncio); the model's OpenMP
# threads spinning between operations for a while (GNU OpenMP's default: 300000 spins, ~3 ms) or sleeping at once;
# and decoding during batches or (where the model has every core) between them.
STACKS = {"h11 + asyncio, spinning": (True, {}, []),
          "h11 + asyncio, passive": (True, {"OMP_WAIT_POLICY": "PASSIVE"}, []),
          "httptools + uvloop, passive": (False, {"OMP_WAIT_POLICY": "PASSIVE"}, []),
          "httptools + uvloop, spinning, decoding during batches": (False, {}, ["--overlap-decoding"]),
          "httptools + uvloop, spinning (serve.py's default)": (False, {}, [])}


def stack(a: argparse.Namespace, images: list[bytes], work: Path) -> None:
    print(f"# python bench/bench_serve.py --stack --seconds {a.seconds:g}: 16 clients, {cpus()} cores, img/s "
          "(slices taken in turn)")
    for name in a.models:
        ckpt = make_checkpoint(name, a.img_size, work)
        servers = {label: Server("--checkpoint", str(ckpt), "--max-file-mb", "1", *args,
                                 env={**(without_fast_http(work / "hide") if slow else {}), **env})
                   for label, (slow, env, args) in STACKS.items()}
        try:
            slices: dict[str, list[dict]] = {label: [] for label in servers}
            for server in servers.values():
                load(server, 4, 2, images)
            for _ in range(a.rounds):
                for label, server in servers.items():
                    slices[label].append(load(server, 16, a.seconds / a.rounds, images))
            base, width = None, max(map(len, servers))
            for label in servers:
                r = summary(slices[label], 16)
                base = base or r["img_s"]
                each = sorted(len(s["latencies"]) / s["wall"] for s in slices[label])
                print(f"{name:12} {label:{width}} {r['img_s']:6.1f} img/s  {r['img_s'] / base:4.2f}x  (slices "
                      f"{each[0]:.0f}-{each[-1]:.0f})  p99 {r['p99_ms']:4.0f} ms  batches of up to "
                      f"{max_batch(servers[label])}", flush=True)
        finally:
            for server in servers.values():
                server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=12.0, help="per measurement")
    p.add_argument("--threads", type=int, help="the model's threads, in the servers and alone (default: the "
                   "server's own choice, every core); 1 on a machine other jobs load: OpenMP threads that wait for "
                   "each other on busy cores lose up to 20x")
    p.add_argument("--ceiling-batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--quick", action="store_true", help="3 s per measurement, 1 and 16 clients")
    p.add_argument("--sweep", action="store_true", help="ResNet18: --max-batch, --max-wait-ms at 1, 4, 16 clients")
    p.add_argument("--stack", action="store_true", help="16 clients: HTTP parser and event loop, OpenMP waiting, "
                   "decoding during or between batches")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="--stack: slices per measurement, taken in turn")
    p.add_argument("--json", default=str(ROOT / "bench" / "results-serve.json"))
    a = p.parse_args()
    if a.quick:
        a.seconds, a.clients = 3.0, [1, 16]
    images = photos()
    with tempfile.TemporaryDirectory(prefix="imgcls-serve-") as tmp:  # (its checkpoints: ~100 MB a model)
        work = Path(tmp)
        if a.sweep or a.stack:
            (sweep if a.sweep else stack)(a, images, work)
            return
        results = [bench_model(name, a, images, work) for name in a.models]
    machine = (f"{cpus()} cores, load average {os.getloadavg()[0]:.1f} at the end, {a.threads or cpus()} model "
               f"thread(s), torch {torch.__version__}")
    Path(a.json).write_text(json.dumps({"machine": machine, "seconds": a.seconds, "results": results}, indent=1))
    print(f"\n{machine}\n\n{table(results)}")


if __name__ == "__main__":
    main()
