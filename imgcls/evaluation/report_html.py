"""eval.py's report.html: one self-contained page with the metrics, a clickable confusion matrix and the figures.

The page must open anywhere, offline and years later, as a single file a user can mail or archive: so
nothing is fetched (no CDN, fonts or scripts; images are data URIs, and a Content-Security-Policy lets the
browser load nothing else: htmlpage.py), every class name is escaped (folder names may hold <, & or quotes),
and each thumbnail is stored once, in one JSON block the page's script reads when a matrix cell is clicked.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.evaluation import htmlpage
from imgcls.evaluation.htmlpage import esc
from imgcls.evaluation.result import ClassScores, EvalResult, LabelScores


@dataclass
class Cell:
    """One confusion-matrix cell: its image count, and the thumbnails the caller kept (at most `count`:
    a capped sample keeps a 10,000-image report a few MB)."""

    count: int
    thumbs: list[tuple[str, bytes]]  # (caption such as "img_0012.jpg 93%", JPEG bytes)


def jpeg_thumbnail(image: np.ndarray, size: int = 64, quality: int = 70) -> bytes:
    """A small JPEG (longest side `size`, aspect kept) of a uint8 HxWx3 image: about 2 KB, so thousands fit in
    one page."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"jpeg_thumbnail wants a uint8 image (0..255), got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"jpeg_thumbnail wants an HxWx3 image, got shape {a.shape}")
    im = Image.fromarray(a).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def write_html(path: Path, result: EvalResult, cells: dict[tuple[int, int], Cell],
               figures: list[tuple[str, Path]]) -> None:
    """Write report.html (atomically: a reader never sees half a page) from eval's result, the thumbnails of
    each confusion cell and the (title, PNG) figures; figures whose file is missing are left out."""
    classes = [str(c) for c in result.classes]
    data = _script_json({"classes": classes,
                         "cells": {f"{i},{j}": {"count": int(c.count),
                                                "thumbs": [[str(cap), base64.b64encode(b).decode("ascii")]
                                                           for cap, b in c.thumbs]}
                                   for (i, j), c in sorted(cells.items())}})
    title = f"Evaluation: {result.data or ''}"
    if result.accuracy is not None:
        title += f" ({result.accuracy:.2f}%)"
    elif result.multilabel is not None and result.multilabel.map is not None:
        title += f" (mAP {result.multilabel.map:.2f}%)"
    body = "\n".join([_summary(result), _per_class(result), _matrix(result.confusion_matrix, classes, cells),
                      _figures(figures), f'<script type="application/json" id="report-data">{data}</script>'])
    htmlpage.write(path, htmlpage.document(title, _CSS, body, _SCRIPT))


def _script_json(obj: Any) -> str:
    """JSON that cannot end its <script> element or open a comment: <, > and & as \\u escapes."""
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _pct(value: Any) -> str:
    return f"{float(value):.2f}%"


def _summary(r: EvalResult) -> str:
    rows = _scores(r) + _calibration(r)
    for label, value in (("Checkpoint", r.checkpoint), ("Data", r.data)):
        if value is not None:
            rows.append((label, f"<code>{esc(value)}</code>"))
    table = "\n".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    confused = ""
    if r.most_confused:
        items = "".join(f"<li>{esc(e.true)} → {esc(e.predicted)}: {int(e.count)}</li>" for e in r.most_confused[:5])
        confused = f"<h3>Most confused (true → predicted: count)</h3>\n<ol>{items}</ol>"
    caveats = "".join(f'<p class="caveat">Optimistic: {esc(c.text)}</p>\n' for c in r.caveats)
    return (f"<header>\n<h1>Evaluation report</h1>\n{caveats}<table class=\"summary\">\n{table}\n</table>\n"
            f"{confused}\n</header>")


def _scores(r: EvalResult) -> list[tuple[str, str]]:
    """The summary's rows of scores: accuracy or mAP and F1, top-k, TTA, the images."""
    rows: list[tuple[str, str]] = []
    if r.accuracy is not None:
        rows.append(("Accuracy", _pct(r.accuracy)))
    ml = r.multilabel
    if ml is not None:
        for value, label in ((ml.map, "mAP (mean average precision over labels)"),
                             (ml.map_without_tta, "mAP without TTA"),
                             (ml.micro_f1, "Micro F1 at the tuned thresholds"),
                             (ml.macro_f1, "Macro F1 at the tuned thresholds"),
                             (ml.exact_match, "Images with exactly their labels")):
            if value is not None:
                rows.append((label, _pct(value)))
    rows += [(f"Top-{k} accuracy", _pct(value)) for k, value in sorted(r.top_k.items())]
    c = r.confidence
    if c is not None and c.tta_accuracy is not None:
        without = c.accuracy_without_tta
        rows.append(("Accuracy with test-time augmentation",
                     _pct(c.tta_accuracy) + (f" (without: {_pct(without)})" if without is not None else "")))
    rows.append(("Images", f"{int(r.images):,}"))
    if r.evaluated:
        rows.append(("Images evaluated", esc(r.evaluated)))
    return rows


def _calibration(r: EvalResult) -> list[tuple[str, str]]:
    """The summary's row on calibration: the expected calibration error, or why there is no temperature."""
    c = r.confidence
    if c is None:
        return []
    ece = c.ece
    if not c.calibrated:
        note = ("this checkpoint has no fitted temperature (trained before calibration); probabilities are the raw "
                "softmax")
        if ece.raw is not None:
            note += f" (ECE {100 * float(ece.raw):.2f}%)"
        return [("Calibration", esc(note))]
    parts = []
    if ece.raw is not None:
        parts.append(f"{100 * float(ece.raw):.2f}% raw")
    if ece.calibrated is not None:
        parts.append(f"{100 * float(ece.calibrated):.2f}% calibrated")
    text = " → ".join(parts) + f" (temperature {float(c.temperature):.3f})"
    if ece.tta is not None:
        text += f"; {100 * float(ece.tta):.2f}% with test-time augmentation"
    return [("Expected calibration error", esc(text))]


def _per_class(r: EvalResult) -> str:
    if r.multilabel is not None and r.multilabel.per_label:
        return _per_label(r.multilabel.per_label)
    if not r.per_class:
        return ""
    order = [c for c in r.classes if c in r.per_class] + [c for c in r.per_class if c not in r.classes]
    rows = []
    for name in order:
        s: ClassScores = r.per_class[name]
        cells = [f'<td data-v="{int(s.support)}">{int(s.support)}</td>']
        for v, text in ((s.accuracy, _pct), (s.precision, "{:.3f}".format), (s.recall, "{:.3f}".format),
                        (s.f1, "{:.3f}".format)):
            cells.append(f'<td data-v="{float(v)!r}">{text(v)}</td>' if v is not None else '<td data-v="-1">–</td>')
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    head = "".join(f'<th title="click to sort">{h}</th>'
                   for h in ("Class", "Support", "Accuracy", "Precision", "Recall", "F1"))
    return (f'<section>\n<h2>Per class</h2>\n<div class="scroll"><table class="sortable" id="per-class">'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>\n</section>")


def _per_label(per_label: dict[str, LabelScores]) -> str:
    """A multi-label model's table: each label's support, threshold, precision, recall, F1 and AP."""
    rows = []
    for name, s in per_label.items():
        cells = [f'<td data-v="{int(s.support)}">{int(s.support)}</td>']
        for v in (s.threshold, s.precision, s.recall, s.f1, s.ap):
            cells.append(f'<td data-v="{float(v)!r}">{float(v):.3f}</td>' if v is not None
                         else '<td data-v="-1">–</td>')
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    head = "".join(f'<th title="click to sort">{h}</th>'
                   for h in ("Label", "Support", "Threshold", "Precision", "Recall", "F1", "AP"))
    return (f'<section>\n<h2>Per label</h2>\n<div class="scroll"><table class="sortable" id="per-class">'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>\n</section>")


MAX_MATRIX_CLASSES = 100  # a bigger matrix is unreadable and its page heavy (a million cells for ImageNet)


def matrix_classes(cm: list[list[int]] | np.ndarray, limit: int = MAX_MATRIX_CLASSES) -> list[int]:
    """The classes the page's matrix shows, in order: all, or the `limit` most involved in mistakes (as
    the true class or the predicted one)."""
    cm = np.asarray(cm, dtype=np.int64)
    if len(cm) <= limit:
        return list(range(len(cm)))
    off = cm - np.diag(np.diag(cm))
    return sorted(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:limit].tolist())


def _matrix(confusion: list[list[int]], classes: list[str], cells: dict[tuple[int, int], Cell]) -> str:
    cm = np.asarray(confusion or [], dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classes) or not classes:
        return ""
    totals = cm.sum(1)
    shown = matrix_classes(cm)
    head = "".join(f'<th title="{esc(classes[j])}"><span>{esc(classes[j])}</span></th>' for j in shown)
    rows = []
    for i in shown:
        name = classes[i]
        tds = []
        for j in shown:
            n = int(cm[i, j])
            kind = "d" if i == j else "o"
            if n == 0 and (i, j) not in cells:
                tds.append(f'<td class="{kind}"></td>' if i == j else "<td></td>")
                continue
            share = n / totals[i] if totals[i] else 0.0
            alpha = 0.08 + 0.92 * share if n else 0.0
            dark = " k" if alpha > 0.55 else ""
            tds.append(f'<td class="{kind}{dark}" data-cell="{i},{j}" tabindex="0" style="--a:{alpha:.2f}" '
                       f'title="{100 * share:.1f}% of the row">{n}</td>')
        rows.append(f'<tr><th title="{esc(name)}">{esc(name)}</th>{"".join(tds)}<td class="t">{totals[i]}</td></tr>')
    part = (f" The {len(shown)} of {len(classes)} classes most involved in mistakes; the whole matrix is in "
            "metrics.json." if len(shown) < len(classes) else "")
    return ('<section>\n<h2>Confusion matrix</h2>\n<p class="note">Rows: true class; columns: predicted class. Shade: '
            "share of the row. Blue: correct (the diagonal); red: mistakes. Click a non-empty cell to see its "
            f'images.{part}</p>\n<div class="scroll matrix"><table id="cm">'
            f'<thead><tr><th class="corner">true \\ predicted</th>{head}<th class="t">images</th></tr></thead>\n'
            "<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>\n"
            '<section id="panel" hidden><h3 id="panel-title"></h3><div id="panel-thumbs"></div></section>\n'
            "</section>")


def _figures(figures: list[tuple[str, Path]]) -> str:
    parts = []
    for title, png in figures:
        png = Path(png)
        if not png.is_file():
            continue
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<figure class="fig"><figcaption>{esc(title)}</figcaption>'
                     f'<img alt="{esc(title)}" src="data:image/png;base64,{b64}"></figure>')
    return "<section>\n<h2>Figures</h2>\n" + "\n".join(parts) + "\n</section>" if parts else ""


_CSS = """#per-class th,#per-class td{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
#per-class tbody th{text-align:left;font-weight:normal}
#per-class thead th:first-child{text-align:left}
#per-class thead th{cursor:pointer;user-select:none;background:#f3f3f3}
#per-class thead th[aria-sort=ascending]::after{content:" ▲"}
#per-class thead th[aria-sort=descending]::after{content:" ▼"}
.matrix{display:inline-block;max-height:80vh;border:1px solid #ddd}
#cm{border-collapse:separate;border-spacing:0}
#cm td,#cm th{border:solid #eee;border-width:0 1px 1px 0;padding:0 4px;min-width:2.2em;height:1.8em;
 text-align:center;font-size:12px}
#cm thead th{position:sticky;top:0;background:#fff;z-index:1;vertical-align:bottom}
#cm thead th span{writing-mode:vertical-rl;transform:rotate(180deg);max-height:10em;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap;display:inline-block}
#cm tbody th{position:sticky;left:0;background:#fff;text-align:right;max-width:14em;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap;font-weight:normal}
#cm thead th.corner{left:0;z-index:2;font-weight:normal;color:#777}
#cm td.d{background:rgba(40,100,220,var(--a,0));box-shadow:inset 0 0 0 1px #9db4e8;font-weight:700}
#cm td.o{background:rgba(215,45,45,var(--a,0))}
#cm td.k{color:#fff}
#cm td.t{color:#777;border-left:2px solid #ccc}
#cm td[data-cell]{cursor:pointer}
#cm td[data-cell]:hover,#cm td.sel{outline:2px solid #111;outline-offset:-2px}
.note{color:#555}
.caveat{margin:0 0 .8em;padding:.4em .6em;border-left:4px solid #d08000;background:#fff6e0}
#panel{margin-top:1em;padding:.6em;border:1px solid #ccc;background:#fafafa}
#panel h3{margin:0 0 .5em;font-size:15px}
#panel-thumbs{display:flex;flex-wrap:wrap;gap:6px}
#panel-thumbs figure{margin:0;width:96px;text-align:center;font-size:11px;overflow-wrap:anywhere}
#panel-thumbs img{width:64px;height:64px;object-fit:contain;image-rendering:auto;background:#eee}
.fig{margin:1em 0}.fig figcaption{font-weight:600;margin-bottom:.3em}.fig img{max-width:100%}
"""
_SCRIPT = """
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const panel = document.getElementById("panel");
  const matrix = document.getElementById("cm");
  function show(td) {
    const key = td.dataset.cell;
    const [i, j] = key.split(",").map(Number);
    const cell = data.cells[key] || {count: Number(td.textContent), thumbs: []};
    for (const el of matrix.querySelectorAll("td.sel")) el.classList.remove("sel");
    td.classList.add("sel");
    document.getElementById("panel-title").textContent =
      `true ${data.classes[i]}, predicted ${data.classes[j]}: showing ${cell.thumbs.length} of ${cell.count}`;
    const figures = cell.thumbs.map(([caption, jpeg]) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/jpeg;base64," + jpeg;
      img.alt = caption;
      const text = document.createElement("figcaption");
      text.textContent = caption;
      figure.append(img, text);
      return figure;
    });
    document.getElementById("panel-thumbs").replaceChildren(...figures);
    panel.hidden = false;
    panel.scrollIntoView({block: "nearest"});
  }
  if (matrix) {
    matrix.addEventListener("click", (e) => {
      const td = e.target.closest("td[data-cell]");
      if (td) show(td);
    });
    matrix.addEventListener("keydown", (e) => {
      const td = e.target.closest("td[data-cell]");
      if (td && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); show(td); }
    });
  }
  for (const table of document.querySelectorAll("table.sortable")) {
    const body = table.tBodies[0];
    for (const th of table.tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const col = th.cellIndex;
        const up = th.getAttribute("aria-sort") !== "ascending";
        for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
        th.setAttribute("aria-sort", up ? "ascending" : "descending");
        const value = (row) => row.cells[col].dataset.v;
        const rows = Array.from(body.rows).sort((a, b) => {
          const x = value(a), y = value(b);
          const d = x === undefined ? a.cells[col].textContent.localeCompare(b.cells[col].textContent)
                                    : Number(x) - Number(y);
          return up ? d : -d;
        });
        body.append(...rows);
      });
    }
  }
})();
"""
