"""The frame of the self-contained HTML pages (eval.py's report.html, clean.py's label_issues.html): one
head, one Content-Security-Policy, one base style, one way of writing the file.

A page must open anywhere, offline and years later: nothing is fetched (images are data URIs and the
policy lets the browser load nothing else; the one inline script it may run is named by its hash), text
from the user's files is escaped, and names holding undecodable bytes are shown as U+FFFD in a UTF-8 file.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path
from typing import Any

from imgcls import files

BASE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{margin:0 0 .4em}h2{margin:1.4em 0 .4em}
table{border-collapse:collapse}
.summary th{text-align:left;padding:2px 1em 2px 0;font-weight:600}
.scroll{overflow:auto;max-width:100%}
"""


def esc(value: Any) -> str:
    """Text for HTML, attributes included."""
    return html.escape(str(value), quote=True)


def policy(script: str | None = None) -> str:
    """The Content-Security-Policy: data: images, inline style, and only `script` (by its hash) to run."""
    allowed = ""
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
        allowed = f"script-src 'sha256-{digest}'; "
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; {allowed}base-uri 'none'; form-action 'none'"


def document(title: str, css: str, body: str, script: str | None = None) -> str:
    """A whole page: the shared head (`css` after BASE_CSS), `body`, and `script` last."""
    ending = f"<script>{script}</script>\n" if script is not None else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy(script)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{esc(title)}</title>
<style>{BASE_CSS}{css}</style>
</head>
<body>
{body}
{ending}</body>
</html>
"""


def write(path: Path, page: str) -> None:
    """Atomically (a reader never sees half a page), as UTF-8 whatever the names in it."""
    files.atomic_write_text(Path(path), page.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
