"""Safe decoding: any image file, whatever its mode or orientation, as RGB uint8 within a pixel and byte budget."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgcls.data import folders

IMAGE_EXTENSIONS = folders.IMAGE_EXTENSIONS
ACCEPTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                  "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# ----------------------------------------------------------------------------- decoding

class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any accepted mode to RGB: alpha over white, 16-bit scaled to 8-bit (not clipped). Integer modes
    are scaled by their depth, never by their content: Pillow opens 16-bit PGM/PPM (scaled to 0..65535)
    and 32-bit TIFF as I, read as 16-bit, so a dark exposure stays dark."""
    mode = img.mode
    if mode not in ACCEPTED_MODES:
        raise BadImage(f"unsupported mode {mode}")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if mode.startswith("I"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# Pillow opens these formats and nothing else: never EPS (Ghostscript), PDF or the rarer plugins
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG also opens MPO (multi-picture) photos


# the pixel limit is checked from the header in open_image(), the same way in every thread: Pillow's
# own warning for it goes through the process-wide warnings filter, which threads cannot share safely
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a half-downloaded file is an error, never grey pixels
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class DecodeBudget:
    """Pixels being decoded at once in this process, bounded: images near the pixel limit (several GB
    each once decoded) wait for each other instead of being decoded on every core at once."""

    def __init__(self, pixels: int):
        self.limit, self.used, self.cond = pixels, 0, threading.Condition()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


BUDGET = DecodeBudget(MAX_PIXELS)
MAX_BYTES = folders.DEFAULT_MAX_BYTES


def read_file(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Anything else (a FIFO, a device, a 2 TB
    sparse file) is refused from fstat() after a non-blocking open, on every path that reads images:
    a file may have changed since the folder was listed, or be named directly (test.py)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        problem = folders.special_file(st.st_mode) or folders.too_large(st.st_size, max_bytes)
        if problem:
            raise BadImage(problem)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None
    finally:
        os.close(fd)


def open_image(source: bytes, draft: int | None = None) -> Image.Image:
    """Decode fully (so truncation shows now) and upright (the EXIF orientation applied, as every viewer
    shows a phone photo); JPEGs at a reduced scale when `draft` allows. The pixel limit is checked
    from the header, before any decoding."""
    try:
        img = Image.open(io.BytesIO(source), formats=FORMATS)
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(f"decompression bomb (too many pixels: {img.width} x {img.height})")
        if draft and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft, draft))  # DCT scaling: keeps both sides >= draft
        with BUDGET.take(img.width * img.height):
            img.load()
    except Image.DecompressionBombError:
        raise BadImage("decompression bomb (too many pixels)") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"not an image (or not one of {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("truncated" if "truncat" in str(e).lower() else f"unreadable ({e})") from None
    return upright(img)


def upright(img: Image.Image) -> Image.Image:
    """The EXIF orientation applied (phones store portraits lying on their side, with a tag)."""
    try:
        if img.getexif().get(ORIENTATION, 1) in range(2, 9):
            return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the pixels as stored
        pass
    return img


ORIENTATION = 0x0112


def decode(path: str | os.PathLike, draft: int | None = None, max_bytes: int = MAX_BYTES) -> Image.Image:
    """A file as an upright RGB picture (see open_image and to_rgb)."""
    return to_rgb(open_image(read_file(path, max_bytes), draft))


def load_image(path: str | os.PathLike, size: int, max_bytes: int = MAX_BYTES, interpolation: str = "bilinear"
               ) -> np.ndarray:
    """Decode to a size x size x 3 uint8 array: shorter side resized to `size`, centre crop (or as the
    crop mode in `interpolation` says: square)."""
    return square(decode(path, size, max_bytes), size, interpolation)


FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}  # (antialiased when shrinking)


def square(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The size x size picture every dataset and cache holds, resized with `interpolation`: the shorter side
    resized and the centre cropped; or, after a '/' (checkpoint.Preprocess.resample: timm's crop modes),
    'squash' (the whole picture resized to the square) or 'border/R,G,B' (its longer side resized, centred
    on a square of that colour)."""
    name, _, mode = interpolation.partition("/")
    w, h = img.size
    if mode.startswith("border/"):
        inner = (max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h))))
        fill = tuple(int(v) for v in mode.split("/")[1].split(","))
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img.resize(inner, FILTERS[name], reducing_gap=3.0), ((size - inner[0]) // 2,
                                                                        (size - inner[1]) // 2))
        return np.array(canvas, dtype=np.uint8)
    s = min(w, h)
    box = (0, 0, w, h) if mode == "squash" else ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    img = img.resize((size, size), FILTERS[name], box=box, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def look_hash(img: Image.Image) -> str:
    """A 256-bit perceptual hash (pHash: the signs of the lowest 16 x 16 DCT frequencies of a 32 x 32
    grey thumbnail against their median), or "plain" for a picture with next to no contrast. Resizing
    and re-encoding a photo keep it within ~22 bits; other pictures differ by 56 or more (bench_check)."""
    from scipy.fft import dctn  # scipy comes with scikit-learn

    grey = np.asarray(img.convert("L").resize((32, 32), Image.BOX), dtype=np.float32)
    if grey.std() < 2.0:
        return "plain"
    low = dctn(grey, norm="ortho")[:16, :16].ravel()[1:]  # without the mean (DC) term
    return np.packbits(np.append(low > np.median(low), False)).tobytes().hex()
