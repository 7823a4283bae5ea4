"""The generated reference stays true: docs/options.md is what docs/make_options.py makes from --help now."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def test_the_options_page_is_what_the_scripts_help_says():
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    make_options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_options)
    assert (ROOT / "docs" / "options.md").read_text() == make_options.page(), \
        "docs/options.md is stale: run python docs/make_options.py"


def test_no_message_or_docstring_sends_the_reader_to_the_readme_for_reference():
    """The reference moved from the README to docs/ (issue 31): a --help, a message or a docstring that says
    "see the README" for it sends the reader to a page that no longer holds it."""
    import ast

    files = [*ROOT.glob("*.py"), *(ROOT / "imgcls").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in files for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and "README" in node.value]
    assert found == [], "name the page under docs/ that holds it"
