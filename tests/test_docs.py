"""The generated reference stays true: docs/options.md is what docs/make_options.py makes from --help now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import ROOT


def make_options():
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_options_page_is_what_the_scripts_help_says():
    assert (ROOT / "docs" / "options.md").read_text() == make_options().page(), \
        "docs/options.md is stale: run python docs/make_options.py"


def test_the_options_page_covers_every_entry_script():
    """"Every option of every script" (README): serve.py, clean.py and tune.py too, not only the first six."""
    from test_layout import ENTRY

    assert {Path(script).stem for script, _ in make_options().SCRIPTS} >= ENTRY


def test_no_message_or_docstring_sends_the_reader_to_the_readme_for_reference():
    """The reference moved from the README to docs/ (issue 31): a --help, a message or a docstring that says
    "see the README" for it sends the reader to a page that no longer holds it."""
    import ast

    files = [*ROOT.glob("*.py"), *(ROOT / "imgcls").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in files for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and "README" in node.value]
    assert found == [], "name the page under docs/ that holds it"


def test_every_link_between_the_readme_and_docs_resolves_to_a_file_and_heading():
    """The reference was split over docs/ (issue 31): a link to a moved page or a renamed heading breaks."""
    import re

    def anchors(page: Path) -> set[str]:  # GitHub's: lower case, punctuation dropped, spaces as dashes
        return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.M)}
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, heading = link.partition("#")
            if link.startswith(("http:", "https:", "mailto:")):
                continue
            target = page.parent / path if path else page
            if not target.exists() or (heading and target.suffix == ".md" and heading not in anchors(target)):
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert broken == []


def test_the_serving_tables_are_the_benchs_last_results():
    """docs/serving.md's table and the README's serve.py rows quote bench/results-serve.json: a sitting measured
    again (after the OpenMP and batching changes) left both on the one before (84.2 img/s where it says 94.6)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "bench_serve.py")
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)  # (its table: the bench prints it, the docs quote it)
    results = json.loads((ROOT / "bench" / "results-serve.json").read_text())["results"]
    serving, readme = (ROOT / "docs" / "serving.md").read_text(), (ROOT / "README.md").read_text()
    for row in bench_serve.table(results).splitlines():
        assert row in serving, row
    for m in results:
        for b, u in zip(m["batched"], m["unbatched"]):
            if b["clients"] == 16:
                quoted = (f"batched {b['img_s']:.1f} img/s | unbatched {u['img_s']:.1f} img/s | "
                          f"**{b['img_s'] / u['img_s']:.2f}x**")
                assert quoted in readme, quoted


def test_the_serving_page_lists_every_option_of_serve_py():
    """docs/serving.md says `--help` "lists them all" and names them: an option added since goes unnamed there."""
    import re

    page = (ROOT / "docs" / "serving.md").read_text()
    listed = set(re.findall(r"`(--[a-z-]+)`", page.partition("## Options")[2].partition("\n## ")[0]))
    helped = set(re.findall(r"\[(--[a-z-]+)", (ROOT / "docs" / "options.md").read_text().partition(
        "usage: serve.py")[2].partition("\n\n")[0]))
    assert helped - listed == set()
