"""Uploads from people we do not know: read within a size and a time limit, split into images in memory
(nothing is written to disk: python-multipart's low-level parser, not Starlette's form reader, which spools
parts over 1 MB to temporary files), and decoded by the same rules as training and test.py (dataset.py:
the formats it opens, the decompression-bomb check from the header, EXIF orientation, --max-file-mb). Each
problem is a BadUpload that names it, with the HTTP status it is answered with: never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from imgcls.data import folders
from imgcls.data import images as image_files
from imgcls.preprocess import Preprocess


class BadUpload(Exception):
    """An upload the server will not use: `status` is the HTTP status, the message the reason shown."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One file of a request, its bytes in memory."""
    name: str
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused as soon as it is known to be over `limit` bytes: from its
    Content-Length before reading any of it, else while it arrives. (The caller limits the time: a client
    that sends a byte a minute holds nothing for long.)"""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadUpload(400, f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > limit:
            raise BadUpload(413, too_big(int(declared), limit))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadUpload(413, too_big(size, limit, "at least "))
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadUpload(400, "the client went away during the upload") from None
    return b"".join(chunks)


def too_big(size: int, limit: int, qualifier: str = "") -> str:
    return (f"the request is {qualifier}{folders.megabytes(size)} MB; the limit is {folders.megabytes(limit)} MB "
            "(serve.py --max-request-mb): send fewer or smaller images per request")


def uploads(body: bytes, content_type: str, name: str, max_images: int) -> list[Upload]:
    """The images of a request: each file of a multipart/form-data body (whatever its field's name), or
    the body itself for any other content type (raw bytes, `name` naming it in the answer)."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        if not body:
            raise BadUpload(400, "no image in the request: send the image's bytes as the body, or files as "
                                 "multipart/form-data")
        return [Upload(name, body)]
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadUpload(400, "multipart/form-data without a boundary: let the HTTP client build the upload")
    files = [p for p in split_multipart(body, boundary, max_images) if p.name is not None]
    if not files:
        raise BadUpload(400, "no file in the form: send each image as a file field (e.g. curl -F file=@cat.jpg)")
    return [Upload(p.name or f"image-{i + 1}", p.data) for i, p in enumerate(files)]


@dataclass
class Part:
    name: str | None  # the file name; None for a plain form field
    data: bytes


MAX_FIELDS = 16  # form fields that are not files, per request (the server reads none of them)


def split_multipart(body: bytes, boundary: bytes, max_images: int) -> list[Part]:
    """A multipart/form-data body's parts, in memory; refused (413) as soon as it has more than `max_images`
    files or MAX_FIELDS other fields: a body of tiny parts would otherwise hold the event loop for seconds
    (a million parts in 64 MB), and every other request with it, past any time limit."""
    parts: list[Part] = []
    counts = {"files": 0, "fields": 0}
    chunks: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    field: list[bytes] = [b""]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        headers[field[0].lower()] = headers.get(field[0].lower(), b"") + data[start:end]

    def on_header_end() -> None:
        field[0] = b""

    def on_part_end() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        parts.append(Part(None if filename is None else filename.decode("utf-8", "replace"), b"".join(chunks)))
        chunks.clear()
        headers.clear()
        counts["fields" if filename is None else "files"] += 1
        if counts["files"] > max_images:
            raise BadUpload(413, f"more than {max_images} images in one request; the limit is {max_images} (serve.py "
                                 "--max-images): send them in several requests")
        if counts["fields"] > MAX_FIELDS:
            raise BadUpload(413, f"more than {MAX_FIELDS} form fields that are not files in one request: send the "
                                 "images as files, with few other fields")

    callbacks = {"on_part_data": lambda data, start, end: chunks.append(data[start:end]),
                 "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except BadUpload:
        raise
    except Exception as e:  # python-multipart's errors for malformed bodies, whatever their type
        raise BadUpload(400, f"the multipart/form-data body is malformed ({str(e)[:100]})") from None
    return parts


def decode(upload: Upload, pre: Preprocess, max_bytes: int) -> torch.Tensor:
    """The image as the model sees it (uint8 3 x img_size x img_size), made exactly as test.py makes it from
    a file (image_files.load_image, then the evaluation crop), from the bytes in memory."""
    if len(upload.data) > max_bytes:
        raise BadUpload(413, f"{folders.too_large(len(upload.data), max_bytes)}".replace("--max-file-mb",
                                                                                      "serve.py --max-file-mb"))
    if not upload.data:
        raise BadUpload(422, "empty file")
    try:
        img = image_files.to_rgb(image_files.open_image(upload.data, pre.resize_size))
        arr = image_files.square(img, pre.resize_size, pre.resample)
    except image_files.BadImage as e:
        raise BadUpload(status_of(str(e)), str(e)) from None
    except Exception as e:  # a crafted file can make a decoder fail in ways Pillow does not wrap: still the file's
        raise BadUpload(422, f"unreadable ({type(e).__name__})") from None
    return pre.crop()(torch.from_numpy(arr).permute(2, 0, 1))


def status_of(reason: str) -> int:
    """415 for what is no image we open, 413 for too many pixels, 422 for a broken one."""
    if reason.startswith("not an image"):
        return 415
    if reason.startswith("decompression bomb"):
        return 413
    return 422
