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
