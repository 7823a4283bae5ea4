"""serve.py's page in a real headless Chromium (Playwright): real files picked or dropped, and what the page
then shows read back, against the API's own answers for the same files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from browser import Watched
from serving import Server, read_file


@pytest.fixture(scope="module")
def server(trained_run):
    s = Server("--checkpoint", str(trained_run))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def files(colours_eval, tmp_path_factory) -> list[Path]:
    notes = tmp_path_factory.mktemp("page") / "notes.txt"
    notes.write_text("not an image")
    return [colours_eval / "red" / "red_000.png", colours_eval / "blue" / "blue_001.png",
            colours_eval / "green" / "green_002.png", notes]


def cards(page) -> list[dict]:
    """What each card shows, once every card has its answer (in the order the files were given)."""
    page.wait_for_function("() => document.querySelectorAll('#results .card').length > 0 && !document.querySelector("
                           "'#results .card.waiting') && Array.from(document.images).every(i => i.complete)")
    return page.evaluate("""() => Array.from(document.querySelectorAll('#results .card'), c => ({
        name: c.querySelector('.name').textContent, verdict: c.querySelector('.verdict').textContent,
        kind: ['done', 'unknown', 'error'].find(k => c.classList.contains(k)),
        bars: Array.from(c.querySelectorAll('.bar'), b => [b.querySelector('.label').textContent,
                         b.querySelector('.value').textContent, b.querySelector('.fill').style.width]),
        picture: (c.querySelector('img') || {}).naturalWidth || 0})).reverse()""")


def answered_errors(watched: Watched) -> list[str]:
    """The page's errors but Chromium's note of the 415 that answered the file that is no image (shown on its card)."""
    return [e for e in watched.errors() if "status of 415" not in e]


def api_answers(server: Server, files: list[Path], query: str = "") -> list[dict]:
    return [server.post(f"/predict{query}", [(p.name, read_file(p))])[1]["results"][0] for p in files]


def test_picked_images_show_their_labels_as_bars(server, watched, files):
    page = watched.open(server.url)
    page.set_input_files("#files", [str(p) for p in files])
    shown = cards(page)
    for card, answer in zip(shown, api_answers(server, files)):
        if answer["status"] == "error":
            assert card["kind"] == "error" and card["verdict"] == answer["error"] and card["bars"] == []
            continue
        assert card["kind"] == "done" and card["verdict"] == answer["label"] and card["picture"] == 32
        assert [b[0] for b in card["bars"]] == [t["label"] for t in answer["top"]]
        assert [float(b[2].rstrip("%")) for b in card["bars"]] == pytest.approx(
            [100 * t["probability"] for t in answer["top"]], abs=0.01)
    assert [c["name"] for c in shown] == [p.name for p in files]
    assert answered_errors(watched) == []


def test_unknown_is_shown_as_such(server, watched, files):
    tops = sorted(a["probability"] for a in api_answers(server, files[:3]))
    cut = round((tops[0] + tops[1]) / 2, 4)  # the least sure image is unknown, the others not
    page = watched.open(server.url + f"?reject_below={cut}")
    page.set_input_files("#files", [str(p) for p in files[:3]])
    shown = cards(page)
    expected = api_answers(server, files[:3], f"?reject_below={cut}")
    assert [c["kind"] for c in shown] == [{"ok": "done", "unknown": "unknown"}[a["status"]] for a in expected]
    assert sum(c["kind"] == "unknown" for c in shown) == 1
    assert all(c["verdict"].startswith("unknown (below") for c in shown if c["kind"] == "unknown")


def test_dropped_files_are_answered(server, watched, files):
    page = watched.open(server.url)
    data = base64.b64encode(read_file(files[0])).decode()
    page.evaluate(f"""() => {{
        const bytes = Uint8Array.from(atob({json.dumps(data)}), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {{type: "image/png"}}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {{dataTransfer: transfer,
                                                                              bubbles: true, cancelable: true}}));
    }}""")
    [card] = cards(page)
    assert card["name"] == "dropped.png" and card["verdict"] == "red" and card["kind"] == "done"


def test_the_heat_map_is_shown_on_request(server, watched, files):
    page = watched.open(server.url)
    page.set_input_files("#files", [str(files[0])])
    cards(page)
    page.click("#results .card button.explain")
    page.wait_for_selector("#results .card figure.heat img")
    shown = page.evaluate("""async () => { const img = document.querySelector('.heat img'); await img.decode();
        return [img.naturalWidth, document.querySelector('.heat figcaption').textContent]; }""")
    assert shown == [32, "evidence for red (grad-cam)"]
    assert watched.errors() == []


def test_the_page_loads_nothing_from_elsewhere(server, watched, files):
    page = watched.open(server.url)
    page.set_input_files("#files", [str(p) for p in files])
    cards(page)
    watched.settle()
    assert watched.requests() and all(u.startswith(server.url) or u.startswith(("blob:", "data:"))
                                      for u in watched.requests()), watched.requests()
    assert answered_errors(watched) == []


def test_the_page_fits_a_phone_screen(server, chromium, files):
    phone = Watched(chromium, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = phone.open(server.url)
        page.set_input_files("#files", [str(p) for p in files])
        cards(page)
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth, "
                              "Math.max(...Array.from(document.querySelectorAll('.card'), c => "
                              "c.getBoundingClientRect().right))]")
        assert width[0] <= width[1] and width[2] <= width[1]
    finally:
        phone.close()


def test_the_page_asks_for_the_key_a_server_needs(trained_run, watched, files):
    s = Server("--checkpoint", str(trained_run), env={"IMGCLS_API_KEY": "s3cret"})
    try:
        page = watched.open(s.url)
        page.wait_for_selector("#key-form", state="visible")
        page.fill("#key", "s3cret")
        page.click("#key-form button")
        page.wait_for_selector("#key-form", state="hidden")
        page.set_input_files("#files", [str(files[0])])
        assert cards(page)[0]["verdict"] == "red"
    finally:
        s.stop()
