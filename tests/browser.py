"""Headless Chromium for the page tests (report.html, serve.py's page), driven by Playwright: the system's
Chromium (Debian's package; Playwright's own browser download is not possible everywhere), each page
watched for console errors, uncaught exceptions and every request it makes."""

from __future__ import annotations

import shutil
from typing import Any

import pytest


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def chromium():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("headless Chromium not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: "
                                   "pip install -r requirements-dev.txt")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu",
                                                                  "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


class Watched:
    """A page in a fresh context, with the errors it logged and the URLs it requested."""

    def __init__(self, browser: Any, **context: Any):
        self.context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.found: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: self.found.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "assert") else None)
        self.page.on("pageerror", lambda e: self.found.append(f"exception: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))

    def open(self, url: str) -> Any:
        self.found.clear()
        self.urls.clear()
        self.page.goto(url, wait_until="load")
        return self.page

    def settle(self) -> None:
        """Let timers and image decodes run, so their errors, if any, have been reported."""
        self.page.evaluate("() => new Promise(r => setTimeout(r, 150))")

    def errors(self) -> list[str]:
        return list(self.found)

    def requests(self) -> list[str]:
        return list(self.urls)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(chromium):
    w = Watched(chromium)
    yield w
    w.close()
