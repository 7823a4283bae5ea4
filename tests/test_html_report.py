"""report_html.py: report.html opened in a real headless Chromium, driven by Playwright (tests/browser.py).

The browser tests load the page from file:// as a user would, and check what a user sees: a page that
is not blank, a confusion cell that shows its thumbnails when clicked, and a console with no errors
(a broken script, a blocked load or a missing favicon all log one). The other tests read the file.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import Watched
from PIL import Image

from imgcls.evaluation import report_html
from imgcls.evaluation.report_html import Cell, jpeg_thumbnail, write_html
from imgcls.evaluation.result import ClassScores, Confidence, Confused, Ece, EvalResult

HOSTILE = 'dog <b>&"\' x'
SCRIPT_NAME = "</script><script>window.pwned = 1</script><!--"
CLASSES = ["cat", HOSTILE, SCRIPT_NAME, "zebra"]
CM = [[8, 1, 0, 0],
      [2, 7, 5, 0],
      [0, 0, 9, 1],
      [0, 3, 0, 6]]
KEEP = 3  # thumbnails kept per cell: cell (1, 2) has 5 images, so the page shows "3 of 5"


# ---------------------------------------------------------------- inputs


def picture(seed: int, size: int = 96, noise: float = 4.0) -> np.ndarray:
    """A smooth colour picture with some texture: compresses like a photo (more `noise`: a busier one)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(1, 6, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], axis=-1)
    img = 127 + 100 * img + rng.normal(0, noise, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def metrics(classes: list[str], cm: list[list[int]], calibrated: bool = True, temperature: float = 1.53) -> EvalResult:
    a = np.array(cm)
    per_class = {}
    for c, name in enumerate(classes):
        if a[c].sum():
            p = a[c, c] / max(1, a[:, c].sum())
            r = a[c, c] / a[c].sum()
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            per_class[name] = ClassScores(accuracy=100 * r, precision=p, recall=r, f1=f1, support=int(a[c].sum()))
    confidence = Confidence(temperature=temperature, calibrated=calibrated, ece=Ece(raw=0.0812, calibrated=0.0213),
                            tta_accuracy=84.25, accuracy_without_tta=80.5)
    return EvalResult(accuracy=100 * np.trace(a) / a.sum(), images=int(a.sum()), classes=classes, confusion_matrix=cm,
                      per_class=per_class, checkpoint="runs/r18/best.pt", data="data/test", top_k={3: 97.5},
                      confidence=confidence, most_confused=[Confused(classes[1], classes[2], 5)])


def make_cells(cm: list[list[int]], keep: int, noise: float = 4.0) -> dict[tuple[int, int], Cell]:
    cells = {}
    for i, row in enumerate(cm):
        for j, n in enumerate(row):
            if n:
                thumbs = [(f"img_{i}{j}{k:04d}.jpg {93 - k}%",
                           jpeg_thumbnail(picture(100 * i + 10 * j + k, noise=noise))) for k in range(min(n, keep))]
                cells[i, j] = Cell(n, thumbs)
    return cells


def make_figures(folder: Path) -> list[tuple[str, Path]]:
    figures = []
    for k, title in enumerate(["Reliability diagram", "Risk-coverage curve"]):
        path = folder / f"figure{k}.png"
        Image.fromarray(picture(k, 120)).save(path)
        figures.append((title, path))
    return figures


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "report.html"
    write_html(path, metrics(CLASSES, CM), make_cells(CM, KEEP), make_figures(tmp_path))
    return path


class Page(HTMLParser):
    """The tags, attributes, text and script bodies of a page, as an HTML parser (a browser's rules) reads it."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


# ---------------------------------------------------------------- the file


def test_nothing_is_fetched_from_elsewhere(report: Path) -> None:
    text = report.read_text()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|url\(|@import", text, re.I)
    page = Page(text)
    links = [(tag, k, v) for tag, attrs in page.tags for k, v in attrs.items()
             if k in ("src", "href", "srcset", "action", "poster", "data")]
    assert links, "the page has no images at all"
    assert all(v and v.startswith("data:") for _, _, v in links), links
    assert ("link", {"rel": "icon", "href": "data:,"}) in page.tags  # no favicon.ico request from file://


def test_hostile_class_names_stay_text(report: Path) -> None:
    page = Page(report.read_text())
    assert [t for t, _ in page.tags].count("script") == 2  # the data block and the page's own script
    assert "b" not in [t for t, _ in page.tags]  # '<b>' in a class name did not become markup
    data = json.loads(page.scripts[0])
    assert data["classes"] == CLASSES
    shown = "".join(page.text)
    assert HOSTILE in shown and SCRIPT_NAME in shown
    titles = [a["title"] for t, a in page.tags if t == "th" and "title" in a]
    assert HOSTILE in titles and SCRIPT_NAME in titles


def test_each_thumbnail_is_stored_once(report: Path) -> None:
    text = report.read_text()
    for cell in make_cells(CM, KEEP).values():
        for _, jpeg in cell.thumbs:
            assert text.count(base64.b64encode(jpeg).decode()) == 1


def test_report_stays_small(tmp_path: Path) -> None:
    classes = [f"class{c}" for c in range(10)]
    cm = [[820 if i == j else 20 for j in range(10)] for i in range(10)]  # 10,000 images
    cells = make_cells(cm, keep=20, noise=110)  # 100 cells x 20 = 2,000 thumbnails of busy pictures
    jpegs = [len(jpeg) for c in cells.values() for _, jpeg in c.thumbs]
    assert len(jpegs) == 2000 and np.mean(jpegs) > 1800  # the caller's ~2 KB each
    path = tmp_path / "report.html"
    figures = make_figures(tmp_path)
    write_html(path, metrics(classes, cm), cells, figures)
    payload = (sum(jpegs) + sum(png.stat().st_size for _, png in figures)) * 4 / 3  # base64
    size = path.stat().st_size
    print(f"report.html for 10 classes, 2,000 thumbnails: {size / 1e6:.2f} MB")
    assert size < 6e6, f"{size / 1e6:.1f} MB"
    assert size < payload + 200_000  # base64 of each image once, plus little else


def test_missing_figures_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, metrics(CLASSES, CM), {}, [("Gone", tmp_path / "absent.png"), *make_figures(tmp_path)])
    text = path.read_text()
    assert "Gone" not in text and "Reliability diagram" in text and text.count("data:image/png") == 2


def test_summary_shows_top_k_tta_and_calibration(report: Path) -> None:
    text = "".join(Page(report.read_text()).text)
    for expected in ("Top-3 accuracy", "97.50%", "84.25% (without: 80.50%)", "8.12% raw", "2.13% calibrated",
                     "temperature 1.530"):
        assert expected in text


def test_uncalibrated_checkpoint_says_so(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(path, metrics(CLASSES, CM, calibrated=False, temperature=1.0), {}, [])
    text = "".join(Page(path.read_text()).text)
    assert ("this checkpoint has no fitted temperature (trained before calibration); probabilities are the raw "
            "softmax") in text
    assert "temperature 1.000" not in text


def test_optional_keys_may_be_absent(tmp_path: Path) -> None:
    m = dataclasses.replace(metrics(CLASSES, CM), confidence=None, top_k={}, most_confused=[], checkpoint=None)
    path = tmp_path / "report.html"
    write_html(path, m, {}, [])
    text = "".join(Page(path.read_text()).text)
    assert "Accuracy" in text and "test-time" not in text and "calibration" not in text.lower()


def test_jpeg_thumbnail_is_a_small_jpeg() -> None:
    jpeg = jpeg_thumbnail(picture(0, 200)[:, :150])
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and max(im.size) == 64 and im.size == (48, 64)
    assert len(jpeg) < 4000
    with pytest.raises(ValueError):
        jpeg_thumbnail(picture(0).astype(np.float32) / 255)


# ---------------------------------------------------------------- the browser (tests/browser.py: Playwright)


def click(page: Any, selector: str) -> None:
    """A real mouse click (pressed and released) at the middle of the element, scrolled into view first."""
    page.locator(selector).first.click()


@pytest.mark.timeout(60)
def test_console_watch_sees_errors(watched: Watched) -> None:
    """The check the other browser tests rely on: a page with errors is seen to have them."""
    watched.open("data:text/html,<script>console.error('one'); throw new Error('two')</script>")
    watched.settle()
    assert len(watched.errors()) == 2, watched.errors()


@pytest.mark.timeout(60)
def test_page_renders(watched: Watched, report: Path) -> None:
    page = watched.open(report.as_uri())
    pixels = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 10


@pytest.mark.timeout(60)
def test_clicking_a_cell_shows_its_thumbnails(watched: Watched, report: Path) -> None:
    page = watched.open(report.as_uri())
    assert page.evaluate("() => document.getElementById('panel').hidden")
    click(page, '#cm td[data-cell="1,2"]')  # true HOSTILE, predicted SCRIPT_NAME: 5 images, 3 kept
    shown = page.evaluate("""async () => {
        const panel = document.getElementById("panel");
        const imgs = Array.from(panel.querySelectorAll("img"));
        await Promise.all(imgs.map(i => i.decode()));
        return {hidden: panel.hidden, title: document.getElementById("panel-title").textContent,
                widths: imgs.map(i => i.naturalWidth),
                captions: Array.from(panel.querySelectorAll("figcaption"), f => f.textContent),
                visible: panel.getBoundingClientRect().height > 0};
    }""")
    expected = make_cells(CM, KEEP)[1, 2]
    assert not shown["hidden"] and shown["visible"]
    assert shown["title"] == f"true {HOSTILE}, predicted {SCRIPT_NAME}: showing 3 of 5"
    assert shown["captions"] == [caption for caption, _ in expected.thumbs]
    assert len(shown["widths"]) == len(expected.thumbs) and all(w == 64 for w in shown["widths"])
    click(page, '#cm td[data-cell="3,1"]')  # another cell replaces the first one's images
    assert page.evaluate("() => document.querySelectorAll('#panel img').length") == 3
    assert page.evaluate("() => document.getElementById('panel-title').textContent").endswith("showing 3 of 3")


@pytest.mark.timeout(60)
def test_console_has_no_errors(watched: Watched, report: Path) -> None:
    page = watched.open(report.as_uri())
    click(page, '#cm td[data-cell="1,2"]')
    click(page, "#per-class thead th:nth-child(2)")
    watched.settle()
    assert watched.errors() == []
    assert page.evaluate("() => window.pwned") is None  # the class name "</script><script>..." ran nothing


@pytest.mark.timeout(60)
def test_page_loads_nothing_but_itself(watched: Watched, report: Path) -> None:
    page = watched.open(report.as_uri())
    click(page, '#cm td[data-cell="1,2"]')
    watched.settle()
    assert all(u == report.as_uri() or u.startswith("data:") for u in watched.requests()), watched.requests()


@pytest.mark.timeout(60)
def test_per_class_table_sorts_on_header_click(watched: Watched, report: Path) -> None:
    page = watched.open(report.as_uri())
    support = "() => Array.from(document.querySelectorAll('#per-class tbody tr'), r => Number(r.cells[1].textContent))"
    click(page, "#per-class thead th:nth-child(2)")
    assert page.evaluate(support) == sorted(np.array(CM).sum(1).tolist())
    click(page, "#per-class thead th:nth-child(2)")
    assert page.evaluate(support) == sorted(np.array(CM).sum(1).tolist(), reverse=True)


@pytest.mark.timeout(60)
def test_two_hundred_classes_render_as_the_most_confused_hundred(watched: Watched, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 200
    cm = (np.eye(n, dtype=int) * 40 + (rng.random((n, n)) < 0.02) * rng.integers(1, 4, (n, n))).tolist()
    first = report_html.matrix_classes(cm)[0]
    path = tmp_path / "report.html"
    write_html(path, metrics([f"class {c} <{c}>" for c in range(n)], cm), {(first, first): Cell(40, [])}, [])
    assert path.stat().st_size < 2e6
    page = watched.open(path.as_uri())
    shape = page.evaluate("""() => {
        const box = document.querySelector("#cm").parentElement;
        return {rows: document.querySelectorAll("#cm tbody tr").length, scrolls: box.scrollHeight > box.clientHeight
                && box.scrollWidth > box.clientWidth};
    }""")
    assert shape == {"rows": report_html.MAX_MATRIX_CLASSES, "scrolls": True}
    click(page, f'#cm td[data-cell="{first},{first}"]')
    assert page.evaluate("() => document.getElementById('panel-title').textContent") == (
        f"true class {first} <{first}>, predicted class {first} <{first}>: showing 0 of 40")
    watched.settle()
    assert watched.errors() == []


def test_module_does_not_import_torch() -> None:
    """eval's report, but no torch: writing a page should not cost loading it (nor need it installed)."""
    code = "import sys; from imgcls.evaluation import report_html; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(report_html.__file__).parents[2]).returncode == 0
