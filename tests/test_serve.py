"""serve.py: a real server in its own process, driven over HTTP on loopback. Its answers are test.py's to
the last digit (a .pt, an .onnx, a multi-label model); bad uploads are 4xx errors that name the problem and
leave the server serving; limits, keys, SIGTERM and worker processes behave as the docs say."""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, call, make_labelled_set, train_args
from PIL import Image
from serving import Server, multipart, png_claiming, read_file, without_fast_http
from test_cli import imports, run_script_in_process

import export
import test as predict
import train

STOPPED = (0, -15)  # (uvicorn, once finished, ends by the signal it was sent: its supervisor sees why)
ONE_BATCH = ("--max-batch", "64")  # a request's images in one batch, as test.py runs them: the same floats
LIMITS = ("--max-file-mb", "0.5", "--max-request-mb", "2", "--timeout", "3")


def rotated_jpeg(path: Path) -> Path:
    """A photo stored on its side with the EXIF tag that turns it upright: red above blue once upright."""
    a = np.zeros((48, 32, 3), np.uint8)
    a[:24], a[24:] = (220, 30, 30), (30, 60, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).rotate(90, expand=True).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def images(colours_eval, tmp_path_factory) -> list[Path]:
    """The unseen colour images, an EXIF-rotated photo, an RGBA PNG and a file that is no image."""
    extra = tmp_path_factory.mktemp("extra")
    Image.new("RGBA", (40, 30), (40, 200, 60, 128)).save(extra / "half-transparent.png")
    (extra / "notes.txt").write_text("not an image")
    return [*sorted(colours_eval.rglob("*.png")), rotated_jpeg(extra / "rotated.jpg"), extra / "half-transparent.png",
            extra / "notes.txt"]


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """The trained run served with small limits, decoding with TMPDIR in an empty folder of its own."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    s = Server("--checkpoint", str(trained_run), "--max-wait-ms", "50", *ONE_BATCH, *LIMITS, env={"TMPDIR": str(tmp)})
    s.tmp = tmp
    yield s
    s.stop()


@pytest.fixture(scope="module")
def onnx_file(trained_run, colours_eval, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed: pip install -r requirements-export.txt")
    assert call(export.main, ["--checkpoint", str(trained_run), "--format", "onnx", "--data", str(colours_eval),
                              "--images", "8", "--out", str(out)]) == 0
    return out


def rows_of_test_py(model: Path, images: list[Path], out: Path, *extra: str) -> list[dict[str, str]]:
    assert call(predict.main, [*map(str, images), "--checkpoint", str(model), "--out", str(out), *extra]) == 0
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def as_row(answer: dict, k: int) -> dict[str, str]:
    """An answer of /predict in predictions.csv's columns."""
    if answer["status"] == "error":
        return {"label": "", "probability": "", "status": f"unreadable: {answer['error']}",
                **{f"{w}_{j}": "" for j in range(1, k + 1) for w in ("label", "probability")}}
    top = {f"{w}_{j}": (t["label"] if w == "label" else f"{t['probability']:.4f}")
           for j, t in enumerate(answer["top"], 1) for w in ("label", "probability")}
    if "labels" in answer:
        return {"labels": " ".join(a["label"] for a in answer["labels"]), "status": "ok", **top,
                "probabilities": json.dumps({a["label"]: a["probability"] for a in answer["labels"]})}
    status = "ok" if answer["status"] == "ok" else f"unknown: {answer['reason']}"
    return {"label": answer["label"], "probability": f"{answer['probability']:.4f}", "status": status, **top}


def same_as_test_py(server: Server, model: Path, images: list[Path], out: Path, query: str = "", *extra: str) -> None:
    expected = rows_of_test_py(model, images, out, *extra)
    status, got = server.post(f"/predict{query}", [(str(p), read_file(p)) for p in images])
    assert status == 200, got
    assert [a["file"] for a in got["results"]] == [str(p) for p in images]
    rows = [as_row(a, 3) for a in got["results"]]
    assert [{k: r[k] for k in row} for r, row in zip(expected, rows)] == rows


def test_answers_are_test_pys_to_the_last_digit(server, trained_run, images, tmp_path):
    same_as_test_py(server, trained_run / "best.pt", images, tmp_path / "plain")


def test_unknown_below_reject_below_is_test_pys(server, trained_run, images, tmp_path):
    _, got = server.post("/predict", [(p.name, read_file(p)) for p in images[:-1]])
    tops = sorted(a["probability"] for a in got["results"])
    cut = round((tops[0] + tops[-1]) / 2, 4)  # some known, some unknown, with test.py's rounding either way
    same_as_test_py(server, trained_run / "best.pt", images, tmp_path / "reject", f"?reject_below={cut}",
                    "--reject-below", str(cut))
    assert {a["status"] for a in server.post(f"/predict?reject_below={cut}",
                                             [(p.name, read_file(p)) for p in images[:-1]])[1]["results"]} == \
        {"ok", "unknown"}


def test_an_onnx_export_answers_as_test_py_runs_it(onnx_file, images, tmp_path):
    s = Server("--checkpoint", str(onnx_file), *ONE_BATCH)
    try:
        same_as_test_py(s, onnx_file, images, tmp_path / "onnx")
        assert s.request("GET", "/model")[0] == 200
        info = json.loads(s.request("GET", "/model")[2])
        assert info["format"] == "onnx" and info["provenance"]["export"]["top1_agreement"] == 1.0
    finally:
        assert s.stop() in STOPPED


def test_a_multilabel_model_answers_every_label_above_its_threshold_as_test_py(tmp_path):
    labels_csv = make_labelled_set(tmp_path / "objects", 40, seed=3, split=True)
    run = tmp_path / "ml-run"
    assert train.main(train_args(labels_csv, run, "--mode", "scratch", "--epochs", "2", "--hflip", "0")) == 0
    images = sorted((tmp_path / "objects" / "img").glob("*.png"))[:8]
    s = Server("--checkpoint", str(run), *ONE_BATCH)
    try:
        same_as_test_py(s, run / "best.pt", images, tmp_path / "ml")
        assert s.post("/predict?reject_below=0.5", [(images[0].name, read_file(images[0]))])[0] == 400
    finally:
        s.stop()


def test_tta_answers_as_test_py_tta(trained_run, images, tmp_path):
    s = Server("--checkpoint", str(trained_run), "--tta", *ONE_BATCH)
    try:
        same_as_test_py(s, trained_run / "best.pt", images, tmp_path / "tta", "", "--tta")
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------- bad uploads

def truncated_png(images: list[Path]) -> bytes:
    data = read_file(images[0])
    return data[: len(data) // 2]


@pytest.mark.parametrize("make, status, says", [
    (lambda images: b"%PDF-1.4 not a picture", 415, "not an image"),
    (truncated_png, 422, "truncated"),
    (lambda images: png_claiming(40_000, 40_000), 413, "decompression bomb"),
    (lambda images: b"\xff\xd8\xff" + os.urandom(600_000), 413, "too large for an image"),
    (lambda images: b"", 422, "empty file"),
])
def test_a_bad_upload_is_a_4xx_that_names_the_problem(server, images, make, status, says):
    code, answer = server.post("/predict", [("bad.jpg", make(images))])
    assert code == status and answer["error"].startswith("bad.jpg: ") and says in answer["error"]
    assert server.post("/predict", [("ok.png", read_file(images[0]))])[0] == 200  # the worker serves on


def test_a_bad_upload_among_good_ones_is_answered_in_its_place(server, images):
    code, answer = server.post("/predict", [("a.png", read_file(images[0])), ("b.png", b"junk"),
                                            ("c.png", read_file(images[1]))])
    assert code == 200
    assert [a["status"] for a in answer["results"]] == ["ok", "error", "ok"]
    assert answer["results"][1]["code"] == 415


def form(boundary: bytes, *parts: bytes) -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


def test_a_form_of_many_fields_is_refused_before_the_rest_is_parsed():
    """A body of tiny parts costs seconds of parsing on the event loop, which nothing else then runs on:
    refused at the limit, as soon as it is passed."""
    from imgcls.serving.uploads import BadUpload, uploads

    field = b'Content-Disposition: form-data; name="x"\r\n\r\nx'
    with pytest.raises(BadUpload) as e:
        uploads(form(b"b", *[field] * 100_000), "multipart/form-data; boundary=b", "image", 4)
    assert e.value.status == 413 and "form fields" in str(e.value)


def test_images_over_the_limit_are_refused_before_the_rest_of_the_form_is_read():
    from imgcls.serving.uploads import BadUpload, uploads

    file = b'Content-Disposition: form-data; name="f"; filename="a.png"\r\n\r\nxx'
    body = form(b"b", *[file] * 5)[:-len(b"--b--\r\n")] + b"--b\r\nnot a header\r\n\r\n"  # (malformed after)
    with pytest.raises(BadUpload) as e:
        uploads(body, "multipart/form-data; boundary=b", "image", 4)
    assert e.value.status == 413 and "--max-images" in str(e.value)


def test_the_raw_body_is_one_image(server, images):
    status, _, data = server.request("POST", "/predict?name=x.png", read_file(images[0]),
                                     {"Content-Type": "image/png"})
    assert status == 200 and json.loads(data)["results"][0]["file"] == "x.png"


@pytest.mark.parametrize("body, kind, status, says", [
    (b"--nope\r\ngarbage", "multipart/form-data; boundary=other", 400, "malformed"),
    (b"x", "multipart/form-data", 400, "without a boundary"),
    (b"", "image/png", 400, "no image"),
])
def test_a_malformed_request_is_a_400(server, body, kind, status, says):
    code, _, data = server.request("POST", "/predict", body, {"Content-Type": kind})
    assert code == status and says in json.loads(data)["error"]


def raw_response(conn: socket.socket) -> str:
    """A whole HTTP response read from a socket: its head, and a body as long as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), b"0"))
    while len(body) < length and (chunk := conn.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_request_over_the_size_limit_is_refused_before_it_is_read(server):
    conn = socket.create_connection((server.host, server.port), timeout=20)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 3000000\r\n\r\n")
    answer = raw_response(conn)  # answered with nothing of the body sent
    conn.close()
    assert answer.startswith("HTTP/1.1 413") and "--max-request-mb" in answer


def test_too_many_images_in_one_request_is_a_413(trained_run, images):
    s = Server("--checkpoint", str(trained_run), "--max-images", "2")
    try:
        code, answer = s.post("/predict", [(p.name, read_file(p)) for p in images[:3]])
        assert code == 413 and "--max-images" in answer["error"]
    finally:
        s.stop()


def test_too_many_requests_at_once_are_json_503s_with_retry_after(trained_run, images):
    """Past the requests a server takes at once, the answer is still the API's: JSON, with Retry-After."""
    s = Server("--checkpoint", str(trained_run), "--max-queue", "1", "--max-batch", "1")
    answers = []

    def send() -> None:
        status, headers, data = s.request("POST", "/predict", read_file(images[0]), {"Content-Type": "image/png"})
        answers.append((status, headers.get("content-type"), headers.get("retry-after"), data))

    try:
        threads = [threading.Thread(target=send) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        s.stop()
    assert {a[0] for a in answers} <= {200, 503} and 200 in {a[0] for a in answers}
    busy = [a for a in answers if a[0] == 503]
    assert busy and all(a[1] == "application/json" and a[2] == "1" and "busy" in json.loads(a[3])["error"]
                        for a in busy), busy[:1]


def test_a_slow_upload_is_cut_off_at_the_time_limit(server):
    conn = socket.create_connection((server.host, server.port), timeout=20)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
    start = time.monotonic()
    answer = raw_response(conn)
    conn.close()
    assert answer.startswith("HTTP/1.1 408") and 2 < time.monotonic() - start < 15


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(server, images):
    """`nc -N`, some HTTP/1.0 clients: the request, then the end of their sending side (the server's batch
    waits 50 ms here, so the end always arrives before the answer is ready)."""
    body = read_file(images[0])
    conn = socket.create_connection((server.host, server.port), timeout=20)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)
    conn.shutdown(socket.SHUT_WR)
    answer = raw_response(conn)
    conn.close()
    assert answer.startswith("HTTP/1.1 200") and '"status": "ok"' in answer.replace('":"', '": "')


def test_a_client_that_half_closes_in_the_middle_of_its_upload_is_let_go_at_once(server):
    conn = socket.create_connection((server.host, server.port), timeout=20)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
    conn.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    answer = raw_response(conn)
    conn.close()
    assert not answer.startswith("HTTP/1.1 2") and time.monotonic() - start < 2  # (not the 3 s --timeout)


@pytest.mark.parametrize("request_bytes", [b"GARBAGE\r\n\r\n", b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
def test_a_request_that_is_not_valid_http_is_a_json_400(server, request_bytes):
    conn = socket.create_connection((server.host, server.port), timeout=10)
    conn.sendall(request_bytes)
    answer = raw_response(conn)
    conn.close()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "not a valid HTTP" in json.loads(body)["error"]


def test_a_request_head_over_the_limit_is_refused_before_it_ends(server):
    """httptools, unlike h11, keeps a request's head whole in memory however long it grows (a 400 MB header
    took 1.2 GB): a head past the limit is answered at once, as JSON, and the worker serves on."""
    conn = socket.create_connection((server.host, server.port), timeout=10)
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)  # no end of the head sent
    answer = raw_response(conn)
    conn.close()
    assert answer.startswith("HTTP/1.1 431") and "header" in json.loads(answer.partition("\r\n\r\n")[2])["error"]
    assert server.request("GET", "/health")[0] == 200


def test_a_request_head_that_does_not_end_is_cut_off_at_the_time_limit(server):
    """A client that sends its head a byte at a time, or opens connections and sends nothing, holds no
    connection past --timeout (the limit on connections would otherwise turn everyone else away)."""
    start = time.monotonic()
    conn = socket.create_connection((server.host, server.port), timeout=20)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    answer = raw_response(conn)
    conn.close()
    assert answer.startswith("HTTP/1.1 408") and "--timeout" in answer and 2 < time.monotonic() - start < 15
    idle = socket.create_connection((server.host, server.port), timeout=20)
    assert idle.recv(100) == b"" and 2 < time.monotonic() - start < 30  # closed, with nothing to answer
    idle.close()


def test_nothing_from_an_upload_is_written_to_disk(server, images):
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(big, "BMP")
    assert 300_000 < len(big.getvalue()) < 500_000
    assert server.post("/predict", [("big.bmp", big.getvalue())] * 4)[0] == 200  # 1.4 MB: over Starlette's spool
    assert list(server.tmp.iterdir()) == []


@pytest.mark.parametrize("query, says", [("topk=0", "topk"), ("reject_below=2", "reject_below"),
                                         ("topk=x", "topk")])
def test_a_bad_query_parameter_is_a_400(server, images, query, says):
    code, answer = server.post(f"/predict?{query}", [("a.png", read_file(images[0]))])
    assert code == 400 and says in answer["error"]


def test_topk_per_request(server, images):
    code, answer = server.post("/predict?topk=1", [("a.png", read_file(images[0]))])
    assert code == 200 and len(answer["results"][0]["top"]) == 1


# ------------------------------------------------------------------------------------------- the other endpoints

def test_explain_gives_the_heat_map_of_the_predicted_class(server, images):
    body, kind = multipart([("a.png", read_file(images[0]))])
    status, headers, png = server.request("POST", "/explain", body, {"Content-Type": kind})
    picture = np.asarray(Image.open(io.BytesIO(png)))
    assert status == 200 and headers["content-type"] == "image/png" and picture.shape == (32, 32, 3)
    assert headers["x-method"] == "grad-cam" and headers["x-label"] == images[0].parent.name
    status, headers, _ = server.request("POST", "/explain?label=green", body, {"Content-Type": kind})
    assert status == 200 and headers["x-label"] == "green"
    assert server.request("POST", "/explain?label=purple", body, {"Content-Type": kind})[0] == 400


def test_model_tells_classes_input_calibration_and_provenance(server, trained_run):
    status, _, data = server.request("GET", "/model")
    info = json.loads(data)
    assert status == 200 and info["classes"] == ["blue", "green", "red"] and info["model"] == "resnet18"
    assert info["input"]["img_size"] == 32 and info["calibration"]["calibrated"]
    assert info["provenance"]["run"] == trained_run.name and info["provenance"]["training"]["epochs"] == 3
    assert str(trained_run) not in data.decode()  # no server paths


def test_one_slow_timing_at_start_does_not_choose_the_batch_size():
    from imgcls.serving.model import doublings, fastest, rates_timed

    true_rates = {1: 10.0, 2: 17.0, 4: 21.0, 8: 30.0, 16: 25.0}
    calls: dict[int, int] = {}

    def seconds(b: int) -> float:  # the first timing of a batch of 8, after its warm-up run, slowed 3x
        calls[b] = calls.get(b, 0) + 1
        return b / true_rates[b] * (3 if b == 8 and calls[b] == 2 else 1)

    assert fastest(rates_timed(seconds, doublings(16))) == 8
    assert all(n == 4 for n in calls.values())  # a warm-up and three timings each


def test_the_batch_size_is_the_fastest_timed_or_the_largest_as_fast():
    """Under load a batch costs more than alone: of sizes the timing alone finds as fast, the largest."""
    from imgcls.serving.model import fastest

    assert fastest({1: 40.0, 2: 30.0, 4: 20.0}) == 1  # batching does not pay: none
    assert fastest({1: 10.0, 2: 17.0, 4: 21.0, 8: 22.0, 16: 18.0}) == 8
    assert fastest({1: 10.0, 4: 23.0, 8: 22.0, 16: 21.5}) == 16
    assert fastest({1: 5.0, 2: 10.0}) == 2


def test_decoding_waits_for_batches_only_where_the_model_has_every_core_of_the_cpu(monkeypatch):
    from imgcls.serving import model
    from imgcls.serving.settings import Settings

    monkeypatch.setattr(model, "cpus", lambda: 4)
    assert model.decodes_between_batches("cpu", 4, Settings("m.pt"))
    assert model.decodes_between_batches("cpu", 2, Settings("m.pt", workers=2))
    assert not model.decodes_between_batches("cpu", 1, Settings("m.pt", workers=2))  # (two cores left free)
    assert not model.decodes_between_batches("cuda", 4, Settings("m.pt"))  # (decoding keeps the GPU fed)
    assert not model.decodes_between_batches("cpu", 4, Settings("m.pt", overlap_decoding=True))


def test_decoding_overlaps_a_model_on_one_thread(monkeypatch):
    """A decoding thread holds up a model's OpenMP team by taking a core from one of its threads; a model on one
    thread (--workers 2 on 2 cores) has no team, and held back, its worker's decodes left idle a core the other
    worker was not using."""
    from imgcls.serving import model
    from imgcls.serving.settings import Settings

    monkeypatch.setattr(model, "cpus", lambda: 2)
    assert not model.decodes_between_batches("cpu", 1, Settings("m.pt", workers=2))


def test_overlapping_decoding_waits_for_images_being_decoded_a_batch_of_ones_time(trained_run):
    s = Server("--checkpoint", str(trained_run), "--max-batch", "4", "--overlap-decoding")
    try:
        serving = json.loads(s.request("GET", "/model")[2])["serving"]
        assert serving["decoding"] == "during batches" and serving["max_batch"] == 4
        assert serving["wait_for_decoding_ms"] == serving["timed_ms"]["1"] > 0 and serving["timed_ms"]["4"] > 0
    finally:
        s.stop()


def test_a_max_batch_larger_than_the_queue_holds_is_not_timed_at_start(trained_run):
    """A batch never holds more than --max-queue images (or one request's --max-images): a --max-batch of 4096
    timed at start as given would take minutes, or all the memory, for a batch that can never form."""
    s = Server("--checkpoint", str(trained_run), "--max-batch", "4096", "--max-queue", "4", "--max-images", "2")
    try:
        serving = json.loads(s.request("GET", "/model")[2])["serving"]
        assert serving["max_batch"] == 4 and set(serving["timed_ms"]) == {"1", "4"}
    finally:
        s.stop()


def test_unknown_paths_and_methods_are_json_errors(server):
    assert server.request("GET", "/nope")[0] == 404
    status, _, data = server.request("GET", "/predict")
    assert status == 405 and "error" in json.loads(data)


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_a_count_that_cannot_be_kept_does_not_fail_the_request(monkeypatch):
    """On a full disk the workers' metrics files cannot grow: the request is answered all the same."""
    from imgcls.serving.metrics import Metrics

    def full_disk(*_: object) -> None:
        raise OSError("no space left on device")

    m = Metrics()
    monkeypatch.setattr(m.requests, "labels", full_disk)
    monkeypatch.setattr(m.batch_images, "observe", full_disk)
    m.request("/predict", 200, 0.01)
    m.request("/predict", 200, 0.01)
    m.batch(4, 0.02)


def test_metrics_count_requests_images_and_batches(server, images):
    before = scrape(server)
    good, bad = ("a.png", read_file(images[0])), ("notes.txt", b"not an image")
    assert server.post("/predict", [good, good])[0] == 200
    assert server.post("/predict", [good, bad])[0] == 200
    assert server.post("/predict", [bad])[0] == 415
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("imgcls_serve_requests_total", endpoint="/predict", status="200") == 2
    assert grew("imgcls_serve_requests_total", endpoint="/predict", status="415") == 1
    assert grew("imgcls_serve_request_seconds_count", endpoint="/predict") == 3
    assert grew("imgcls_serve_images_total", outcome="ok") == 3
    assert grew("imgcls_serve_images_total", outcome="bad") == 2
    assert grew("imgcls_serve_batch_images_sum") == 3 and 1 <= grew("imgcls_serve_batch_images_count") <= 2
    assert grew("imgcls_serve_batch_seconds_sum") > 0


def test_images_turned_away_with_a_503_are_not_counted_as_answered(trained_run, images):
    """A request refused because the model's queue is full was never answered: its images are not "ok"."""
    s = Server("--checkpoint", str(trained_run), "--max-queue", "1", "--max-batch", "1")
    pair = [("a.png", read_file(images[0]))] * 2  # (two images: refused whenever another request's image waits)
    answers: list[tuple[int, Any]] = []
    try:
        clients = [threading.Thread(target=lambda: answers.extend(s.post("/predict", pair) for _ in range(3)))
                   for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        counted = scrape(s).get(("imgcls_serve_images_total", (("outcome", "ok"),)), 0)
    finally:
        assert s.stop() in STOPPED
    assert any(code == 503 and "waiting for the model" in a["error"] for code, a in answers)
    assert counted == 2 * sum(code == 200 for code, _ in answers)


# ------------------------------------------------------------------------------------------- the process

def test_a_key_is_required_when_set_and_health_stays_open(trained_run, images):
    s = Server("--checkpoint", str(trained_run), env={"IMGCLS_API_KEY": "s3cret"})
    try:
        files = [("a.png", read_file(images[0]))]
        assert s.post("/predict", files)[0] == 401
        assert s.post("/predict", files, {"Authorization": "Bearer wrong"})[0] == 401
        assert s.post("/predict", files, {"Authorization": "Bearer s3cret"})[0] == 200
        assert s.post("/predict", files, {"X-API-Key": "s3cret"})[0] == 200
        assert s.request("GET", "/model")[0] == 401 and s.request("GET", "/health")[0] == 200
        assert s.request("GET", "/metrics")[0] == 401  # (how busy, and with what: not for anyone to read)
        assert s.request("GET", "/")[0] == 200  # the page holds nothing secret; it asks for the key
        info = json.loads(s.request("GET", "/model", headers={"X-API-Key": "s3cret"})[2])
        assert info["serving"]["max_batch"] in (1, 2, 4, 8, 16)  # timed at start
        serving = info["serving"]  # the model has every core: decoding waits for batches, a batch for a full one's time
        assert serving["decoding"] == "between batches" and serving["wait_for_decoding_ms"] > 0
        assert serving["wait_for_decoding_ms"] == serving["timed_ms"][str(serving["max_batch"])]
    finally:
        s.stop()


def test_a_request_of_many_slow_images_does_not_hold_up_another_requests_decoding(trained_run, images):
    """Each request has at most a decoding thread's share of the pool at a time: a request of large PNGs (within
    every limit, ~0.3 s each to decode) queued all its decodes ahead of a later request's before."""
    slow = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 30)).save(slow, "PNG")  # (120 KB)
    s = Server("--checkpoint", str(trained_run))
    try:
        done: dict[str, float] = {}

        def post(name: str, files: list[tuple[str, bytes]]) -> None:
            assert s.post("/predict", files)[0] == 200
            done[name] = time.monotonic()

        big = threading.Thread(target=post, args=("big", [(f"big{i}.png", slow.getvalue()) for i in range(8)]))
        big.start()
        time.sleep(0.3)  # (its decoding has begun)
        post("small", [("a.png", read_file(images[0]))])
        big.join(60)
        assert done["small"] + 0.5 < done["big"]
    finally:
        s.stop()


def test_sigterm_finishes_the_request_in_flight_and_takes_no_new_one(trained_run, images):
    s = Server("--checkpoint", str(trained_run))
    body, kind = multipart([(p.name, read_file(p)) for p in images[:4]])
    conn = socket.create_connection((s.host, s.port), timeout=30)
    conn.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
    time.sleep(0.5)  # the request has started
    s.proc.send_signal(15)
    time.sleep(1.0)
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection((s.host, s.port), timeout=5).close()
    conn.sendall(body[100:])
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b'"status":"ok"') == 4
    assert s.proc.wait(60) in STOPPED


@pytest.fixture(scope="module")
def two_workers(trained_run):
    """Two worker processes."""
    s = Server("--checkpoint", str(trained_run), "--workers", "2")
    yield s
    assert s.stop() in STOPPED


def test_workers_share_the_port(two_workers, images):
    results = []
    files = [("a.png", read_file(images[0]))]
    threads = [threading.Thread(target=lambda: results.append(two_workers.post("/predict", files)[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert "2 worker(s)" in "".join(two_workers.output)


def test_metrics_sum_every_worker(two_workers, images):
    """Each worker counts its own; a scrape, whichever worker answers it, gives the sum over them all."""
    key = ("imgcls_serve_requests_total", (("endpoint", "/predict"), ("status", "200")))
    before = [scrape(two_workers).get(key, 0) for _ in range(8)]
    files = [("a.png", read_file(images[0]))]
    answers: list[int] = []
    clients = [threading.Thread(target=lambda: answers.extend(two_workers.post("/predict", files)[0]
                                                              for _ in range(3))) for _ in range(8)]
    for t in clients:  # at once, so that both workers take some
        t.start()
    for t in clients:
        t.join()
    assert answers == [200] * 24
    after = [scrape(two_workers)[key] for _ in range(8)]
    assert len(set(before)) == 1  # every scrape the same sum: never one worker's share alone
    assert {a - before[0] for a in after} == {24}


def test_every_worker_counts_in_one_folder_removed_at_the_end(trained_run, tmp_path):
    """The workers' metrics go through one folder (prometheus_client's multiprocess mode, a file per metric kind
    and process), which is what lets any worker's scrape sum them all; it goes when the server does."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    s = Server("--checkpoint", str(trained_run), "--workers", "2", env={"TMPDIR": str(tmp)})
    try:
        [folder] = tmp.iterdir()
        assert folder.name.startswith("imgcls-serve-metrics-")
        deadline = time.monotonic() + 60  # (the server answers once one worker is up; the other may still load)
        while len(workers := {p.stem.rpartition("_")[2] for p in folder.glob("histogram_*.db")}) < 2:
            assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
            time.sleep(0.2)
        assert len(workers) == 2
    finally:
        assert s.stop() in STOPPED
    assert list(tmp.iterdir()) == []


def holding_another_db(folder: Path) -> None:
    folder.mkdir()
    (folder / "cache.db").write_bytes(b"SQLite format 3\x00")  # (a scrape reads every *.db there as its own)


@pytest.mark.parametrize("make, says", [(lambda p: None, "does not exist"), (lambda p: p.write_text("x"),
                                                                             "is not a folder"),
                                        (holding_another_db, "holds files that are not prometheus_client's")])
def test_a_metrics_folder_that_cannot_be_used_is_one_line_before_torch_loads(trained_run, tmp_path, monkeypatch,
                                                                             make, says):
    """prometheus_client would fail at the first count, in every worker (and uvicorn start them again, without end)."""
    folder = tmp_path / "metrics"
    make(folder)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    result = run_script_in_process("serve.py", "--checkpoint", str(trained_run))
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert f"PROMETHEUS_MULTIPROC_DIR {folder} {says}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_metrics_folder_variable_is_taken_as_not_set(trained_run, images):
    """PROMETHEUS_MULTIPROC_DIR= (as a container's environment may leave it): prometheus_client would count in files
    of the current folder, left there."""
    before = set(ROOT.glob("*.db"))
    s = Server("--checkpoint", str(trained_run), env={"PROMETHEUS_MULTIPROC_DIR": ""})
    try:
        assert s.post("/predict", [("a.png", read_file(images[0]))])[0] == 200
        assert scrape(s)[("imgcls_serve_images_total", (("outcome", "ok"),))] == 1
        written = set(ROOT.glob("*.db")) - before
    finally:
        assert s.stop() in STOPPED
        for p in set(ROOT.glob("*.db")) - before:
            p.unlink()
    assert written == set()


def test_counts_in_a_given_metrics_folder_start_from_zero(trained_run, images, tmp_path):
    """A folder of the user's, kept from an earlier run: its counts are not this server's (prometheus_client's files
    are named by process id, which a container reuses at every start)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    earlier = ("from prometheus_client import Counter; Counter('imgcls_serve_requests', '', ['endpoint', 'status'])"
               ".labels('/predict', '200').inc(1000)")
    subprocess.run([sys.executable, "-c", earlier], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
                   check=True)
    assert any(p.name.startswith("counter_") for p in folder.iterdir())
    s = Server("--checkpoint", str(trained_run), env={"PROMETHEUS_MULTIPROC_DIR": str(folder)})
    try:
        assert s.post("/predict", [("a.png", read_file(images[0]))])[0] == 200
        assert scrape(s)[("imgcls_serve_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 1
    finally:
        assert s.stop() in STOPPED
    assert (folder / "notes.txt").exists()  # (kept, and only prometheus_client's files go)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_memory_a_burst_of_uploads_took_goes_back_once_the_server_is_idle(two_workers):
    """Freed memory is kept for the next batch (machine.tune_cpu_allocator), in every worker: without a
    release once idle, a burst of large uploads (64 MB each at most) left each worker that much larger for good."""
    before = two_workers.rss_mb()
    body = os.urandom(30 * 2**20)  # (no image: a 415, after the whole body is read)

    def send() -> None:
        for _ in range(2):
            assert two_workers.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})[0] == 415

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(3)
    assert two_workers.rss_mb() - before < 100, (before, two_workers.rss_mb())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_memory_the_timing_at_start_took_goes_back_before_any_request(trained_run):
    """The start times full batches (VGG11 at 224 px: 540 MB of activations); freed memory went back only once a
    request had been answered, so a server that load balancers only asked for /health kept it for good."""
    s = Server("--checkpoint", str(trained_run), "--max-batch", "256")
    try:
        time.sleep(2)
        idle = s.rss_mb()
        assert s.request("GET", "/model")[0] == 200
        time.sleep(2.5)  # (released once idle for 1 s: app.RELEASE_AFTER_S)
        assert idle - s.rss_mb() < 15, (idle, s.rss_mb())
    finally:
        s.stop()


def test_the_server_runs_on_h11_where_httptools_is_missing(trained_run, images, tmp_path):
    s = Server("--checkpoint", str(trained_run), env=without_fast_http(tmp_path / "hidden"))
    try:
        status, got = s.post("/predict", [("a.png", read_file(images[0]))])
        assert status == 200 and got["results"][0]["status"] == "ok"
    finally:
        assert s.stop() in STOPPED


ONE_TEAM = """
import asyncio, os, sys, threading
from imgcls import runfolder
from imgcls.serving.app import Server
from imgcls.serving.model import Served
from imgcls.serving.settings import Settings
from imgcls.serving.uploads import Upload, decode
def others():  # threads Python did not start: OpenMP's
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())
before = others()
served = Served(Settings(str(runfolder.runnable(runfolder.find(sys.argv[1]))), threads=int(sys.argv[2])))
server = Server(served, None)  # (the batch size timed)
upload = Upload("a.png", open(sys.argv[3], "rb").read())
for _ in range(3):
    decoded = [server.decoders.submit(decode, upload, served.loaded.preprocess, 2**20) for _ in range(4)]
    asyncio.run(server.batcher.predict([d.result() for d in decoded]))
print(others() - before)
server.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in Linux's /proc")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_worker_runs_its_model_on_one_team_of_openmp_threads(trained_run, images, threads):
    """Only the model's thread runs torch in parallel, so OpenMP keeps threads - 1 helpers, no more. Each other
    thread that did (the batch size was timed on the main thread) kept a team of its own, more threads than
    cores: GNU OpenMP then stops its threads spinning between operations, and the model ran at 0.6-0.8 of its
    speed alone, in the server and with --max-batch 1 too. In a fresh process: the count is per process."""
    out = subprocess.run([sys.executable, "-c", ONE_TEAM, str(trained_run), str(threads), str(images[0])], cwd=ROOT,
                         text=True, capture_output=True, check=True).stdout
    assert int(out.split()[-1]) == threads - 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in Linux's /proc")
def test_an_onnx_model_runs_on_onnx_runtimes_threads_alone(onnx_file, images):
    """ONNX Runtime keeps its own pool of threads - 1 helpers: the model thread's one torch operation (the
    batch made float) must not start an OpenMP team beside it, whose threads would spin on the same cores."""
    script = "import onnxruntime\n" + ONE_TEAM  # (which starts a thread of its own as it loads)
    out = subprocess.run([sys.executable, "-c", script, str(onnx_file), "2", str(images[0])], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert int(out.split()[-1]) == 1


@pytest.mark.parametrize("args, hint", [
    (["--host", "0.0.0.0"], "serves the network: require a key"),
    (["--port", "70000"], "--port must be"),
    (["--reject-below", "1.5"], "is not a probability"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--checkpoint", "/no/such/run"], "does not exist"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--api-key", "clé"], "printable ASCII"),  # sent as UTF-8 by curl, read as Latin-1: never matched
    (["--api-key", "two words"], "printable ASCII"),  # (HTTP strips a header's spaces at the ends)
])
def test_a_bad_command_line_is_one_line_before_torch_loads(args, hint):
    result = run_script_in_process("serve.py", *args)
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_key_from_the_environment_no_client_can_send_is_refused_before_torch_loads(monkeypatch):
    monkeypatch.setenv("IMGCLS_API_KEY", "s3cret\n")
    result = run_script_in_process("serve.py", "--checkpoint", "/no/such/run")
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert "IMGCLS_API_KEY" in result.stderr and "printable ASCII" in result.stderr


def test_a_port_in_use_is_one_line_before_torch_loads(trained_run):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_script_in_process("serve.py", "--checkpoint", str(trained_run), "--port", str(port))
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_missing_metrics_library_is_one_line_before_torch_loads(trained_run, tmp_path, monkeypatch):
    """prometheus_client is in requirements-serve.txt like the web libraries: its absence is said as theirs is."""
    (tmp_path / "prometheus_client").mkdir()
    (tmp_path / "prometheus_client" / "__init__.py").write_text("raise ImportError('prometheus_client hidden')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = run_script_in_process("serve.py", "--checkpoint", str(trained_run))
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert "requirements-serve.txt" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_serving_code_keeps_the_projects_shape():
    """No entry script imported (serve.py's library included), no function over 80 lines."""
    sources = [ROOT / "serve.py", *sorted((ROOT / "imgcls").rglob("*.py"))]
    assert all(not imports(p) & {"train", "eval", "test", "export", "runs", "serve"} for p in sources)
    long = [f"{p.name}:{n.name}" for p in sources for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
