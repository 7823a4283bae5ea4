"""label_issues.html: one self-contained page, like eval.py's report.html, with every issue and its picture.

It opens anywhere, offline: nothing is fetched (pictures are data URIs; a Content-Security-Policy lets the
browser load nothing else and run no script), and every text from the user's files (paths, class names,
which may hold <, &, quotes or $) is escaped.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from imgcls.cleaning.issues import KINDS, Issue, label_names
from imgcls.cleaning.job import Job
from imgcls.cleaning.oof import Predictions
from imgcls.evaluation import htmlpage, report_html
from imgcls.evaluation.htmlpage import esc
from imgcls.evaluation.predictor import thumbnail

MAX_ROWS = 300  # per kind with a picture: a page of a few MB however many issues; all are in the CSV
TITLES = {"label": "Label issues: the given label looks wrong",
          "outlier": "Outliers: images that look like none of the classes",
          "look-alike": "Look-alikes across classes: the same picture with two labels"}
ABOUT = {"label": "Ranked by the out-of-fold probability that the given label is wrong (multi-label: by 1 - "
                  "cleanlab's label quality score). Suggested: the label the models give instead.",
         "outlier": "Ranked by cleanlab's outlier score on the network's own features (higher: further from every "
                    "image the fold's model trained on).",
         "look-alike": "Pairs whose perceptual hashes (as dataset.py check compares them) match, labelled differently. "
                       "Suggested: the label the models give the pair."}


def write_page(path: Path, job: Job, pred: Predictions, issues: list[Issue], sep: str, picture: Path) -> None:
    counts = Counter(i.kind for i in issues)
    scored = int(pred.readable.sum())
    summary = [("k-fold job", f"<code>{esc(job.folder)}</code>"), ("Data", f"<code>{esc(job.data)}</code>"),
               ("Images scored", f"{scored:,} of {len(pred.items):,}" + (" (multi-label)" if pred.multilabel else "")),
               *((TITLES[k].split(":")[0], f"{counts.get(k, 0):,}") for k in KINDS)]
    if scored:
        summary.append(("Flagged as mislabelled", f"{100 * counts.get('label', 0) / scored:.1f}% of the images"))
    table = "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in summary)
    figure = ""
    if picture.is_file():
        b64 = base64.b64encode(picture.read_bytes()).decode("ascii")
        figure = f'<figure><img alt="the worst issues" src="data:image/png;base64,{b64}"></figure>'
    sections = "\n".join(section(kind, pred, [i for i in issues if i.kind == kind], sep) for kind in KINDS)
    body = f"""<header><h1>Label issues</h1>
<p class="note">Mark each row's <b>action</b> in label_issues.csv (keep, relabel, drop), then
<code>python clean.py apply label_issues.csv --out corrected.csv</code> writes a label file for
<code>train.py --data</code>; your image folders are never changed.</p>
<table class="summary">{table}</table></header>
{figure}
{sections}"""
    htmlpage.write(path, htmlpage.document(f"Label issues: {job.data}", CSS, body))


def section(kind: str, pred: Predictions, issues: list[Issue], sep: str) -> str:
    if not issues:
        return f'<section><h2>{esc(TITLES[kind])}</h2><p class="note">None found.</p></section>'
    rows = []
    for rank, issue in enumerate(issues[:MAX_ROWS], 1):
        path, given = pred.items[issue.index]
        image = thumbnail(path, 96)
        img = ('<img alt="" src="data:image/jpeg;base64,' +
               base64.b64encode(report_html.jpeg_thumbnail(image, 96)).decode("ascii") + '">') if image is not None \
            else "unreadable"
        rows.append(f"<tr><td>{rank}</td><td>{img}</td><td class=\"path\">{esc(path)}</td>"
                    f"<td>{esc(label_names(pred, given, sep))}</td><td>{esc(label_names(pred, issue.suggested, sep))}"
                    f"</td><td>{issue.score:.3f}</td><td class=\"note\">{esc(issue.note)}</td></tr>")
    more = (f'<p class="note">… and {len(issues) - MAX_ROWS:,} more in label_issues.csv.</p>'
            if len(issues) > MAX_ROWS else "")
    head = "".join(f"<th>{h}</th>" for h in ("#", "", "File", "Given", "Suggested", "Score", "Why"))
    return (f'<section><h2>{esc(TITLES[kind])} ({len(issues):,})</h2><p class="note">{esc(ABOUT[kind])}</p>'
            f'<div class="scroll"><table class="issues"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) +
            f"\n</tbody></table></div>{more}</section>")


CSS = """.issues th,.issues td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:middle}
.issues thead th{background:#f3f3f3}
.issues img{width:96px;height:96px;object-fit:contain;background:#eee}
.path{overflow-wrap:anywhere;max-width:28em;font-family:monospace;font-size:12px}
.note{color:#555}
figure img{max-width:100%}
"""
