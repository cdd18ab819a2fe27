"""The search page in real headless Chromium: type a query, see results, move with the keyboard, play."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from library_fakes import FREQS, BandTower, IdentityModel, LabelWordTower, write_tone

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(lib):
    """Serve ``lib`` on a free port in a thread: (url, stop)."""
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (`make browser` installs it)")
    pytest.importorskip("playwright.sync_api")
    uvicorn = pytest.importorskip("uvicorn")
    from atae.server.app import create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(lib), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)

    def stop():
        srv.should_exit = True
        th.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def server(tmp_path):
    from atae.library import Library

    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=3.0, sr=16000)
    write_tone(d / "field" / "recording.wav", None, seconds=60.0, sr=16000, event=(41.0, 3.0, FREQS["high"]))
    lib = Library.open(
        tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=LabelWordTower(),
        model=IdentityModel(LabelWordTower())
    )
    lib.add([d])
    url, stop = _serve(lib)
    yield url, d
    stop()
    lib.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _page(browser, errors):
    # bypass_csp: the page itself never evals, but Playwright's wait_for_function does
    page = browser.new_page(viewport={"width": 1100, "height": 800}, bypass_csp=True, accept_downloads=True)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def test_search_results_keyboard_and_play(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, sounds = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            # bypass_csp: the page itself never evals, but Playwright's wait_for_function does
            page = browser.new_page(viewport={"width": 1100, "height": 800}, bypass_csp=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#q", "mid")
            page.press("#q", "Enter")
            page.wait_for_selector("li.result")
            assert page.inner_text("li.result .name") == "mid.wav"
            assert page.inner_text("li.result .folder") == str(sounds)
            assert page.locator("li.result").count() == 4
            assert "result(s)" in page.inner_text("#status")
            # waveform thumbnails load
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.wave img'))"
                ".every(i => i.complete && i.naturalWidth === 480)"
            )
            # keyboard: arrow down from the box selects the first result, again the second
            page.press("#q", "ArrowDown")
            page.keyboard.press("ArrowDown")
            sel = page.locator("li.result.selected")
            assert sel.count() == 1 and sel.locator(".rank").inner_text() == "2"
            page.keyboard.press("ArrowUp")
            assert page.locator("li.result.selected .rank").inner_text() == "1"
            # space plays the selected result
            page.keyboard.press(" ")
            page.wait_for_function(
                "() => { const a = document.querySelector('li.result.selected audio');"
                " return a && !a.paused && a.currentTime > 0.05; }",
                timeout=15000,
            )
            page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)
            page.keyboard.press(" ")
            assert page.evaluate("document.querySelector('li.result.selected audio').paused")

            # a long recording: the result shows the matching span, and play starts there (seek = ranges)
            page.fill("#q", "high")
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelectorAll('li.result .span').length > 0")
            li = page.locator("li.result", has=page.locator(".span")).first
            assert li.locator(".name").inner_text() == "recording.wav"
            li.focus()
            page.keyboard.press(" ")
            page.wait_for_function(
                "() => { const a = document.querySelector('li.result.selected audio');"
                " return a && !a.paused && a.currentTime >= 35; }",
                timeout=15000,
            )
            page.screenshot(path=str(tmp_path / "long-match.png"))

            # the scorer menu in plain words: all three usable here (a model and a tagging tower), the
            # strongest (model + tags) chosen
            page.wait_for_function("!document.querySelector('#scorer option[value=hybrid]').disabled")
            assert page.eval_on_selector(
                "#scorer", "s => [s.value, [...s.options].filter(o => !o.disabled).map(o => o.text)]"
            ) == ["hybrid", ["model + tags", "trained model", "zero-shot tags"]]
            page.select_option("#scorer", "bridge")
            with page.expect_response(lambda r: "scorer=bridge" in r.url) as resp:
                page.fill("#q", "mid")
                page.press("#q", "Enter")
            assert resp.value.status == 200 and resp.value.json()["scorer"] == "bridge"
            page.select_option("#scorer", "adapter")

            # a bad query shows the server's message, not a blank page
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            page.wait_for_function("document.querySelector('#status').classList.contains('error')")
            assert "empty" in page.inner_text("#status")

            # query by example through the file picker (the same path as drag and drop)
            page.set_input_files("#file", str(sounds / "low.wav"))
            page.wait_for_function(
                "document.querySelector('#status').textContent.includes('sounds like')"
                " && document.querySelectorAll('li.result').length > 0"
            )
            assert page.inner_text("li.result .name") == "low.wav"

            # a real drop event carrying a file (the bytes of the indexed high tone, fetched by id)
            page.evaluate(
                """async () => {
                  const hit = (await (await fetch('/api/search?q=high&k=1')).json()).results[0];
                  const blob = await (await fetch(`/api/audio/${hit.file_id}`)).blob();
                  const dt = new DataTransfer();
                  dt.items.add(new File([blob], 'dropped.wav', {type: 'audio/wav'}));
                  window.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt}));
                  window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt}));
                }"""
            )
            page.wait_for_function(
                "document.querySelector('#status').textContent.includes('dropped.wav')"
                " && !document.querySelector('#status').textContent.includes('searching')"
            )
            assert page.locator("#drop").is_hidden()
            assert page.inner_text("li.result .name") == "high.wav"
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "search-page.png").stat().st_size > 10_000


def _settled(page):
    page.wait_for_function("!document.querySelector('#status').textContent.includes('searching')"
                           " && !document.querySelector('#status').textContent.includes('loading')")
    return page.inner_text("#status")


def test_shared_links_more_like_this_download_and_gone_files(server, browser, tmp_path):
    url, sounds = server
    errors: list[str] = []
    page = _page(browser, errors)
    # a link with a search runs it on load, with the scorer and count it names
    page.goto(url + "/?q=low&scorer=adapter&k=10")
    page.wait_for_selector("li.result")
    assert page.input_value("#q") == "low" and page.input_value("#scorer") == "adapter"
    assert page.input_value("#k") == "10" and page.inner_text("li.result .name") == "low.wav"
    # why it matched: the 400 Hz tone's tag (band 1 = AudioSet label 1) is marked
    assert page.locator("li.result").first.locator(".tag.matched").all_inner_texts() == [
        "Male speech, man speaking"]
    page.screenshot(path=str(tmp_path / "tags.png"))

    # a new search updates the address; Back returns to the previous one
    page.fill("#q", "mid")
    page.press("#q", "Enter")
    page.wait_for_function("document.querySelector('li.result .name').textContent === 'mid.wav'")
    assert "q=mid" in page.url and "scorer=adapter" in page.url
    page.go_back()
    page.wait_for_function("document.querySelector('li.result .name').textContent === 'low.wav'")
    assert page.input_value("#q") == "low"

    # more like this: a shareable address, the source file left out
    page.locator("li.result").first.locator("button.more").click()
    page.wait_for_function("location.search.includes('like=')")
    assert "sounds like low.wav" in _settled(page)
    names = page.locator("li.result .name").all_inner_texts()
    assert names and "low.wav" not in names
    liked = page.url
    page.goto(liked)
    assert "sounds like low.wav" in _settled(page)

    # download the original file
    page.goto(url + "/?q=mid&scorer=adapter")
    page.wait_for_selector("li.result")
    with page.expect_download() as dl:
        page.locator("li.result").first.locator("a.download").click()
    assert dl.value.suggested_filename == "mid.wav"
    assert open(dl.value.path(), "rb").read() == (sounds / "mid.wav").read_bytes()

    # a file deleted after indexing: the result says so instead of showing a dead player
    (sounds / "mid.wav").unlink()
    page.reload()
    page.wait_for_selector("li.result")
    first = page.locator("li.result").first
    assert first.locator(".name").inner_text() == "mid.wav"
    assert "no longer on disk" in first.locator(".missing").inner_text()
    assert first.locator("audio").count() == 0
    assert errors == []


@pytest.mark.parametrize("address, says", [
    ("/?q=bell%1B%5B0m&scorer=bridge", "control character"),
    ("/?q=" + "a" * 10_001, "the limit is 10000"),
    ("/?q=%20%20", "empty"),
    ("/?like=424242", "no indexed sound has the segment id 424242"),
    ("/?like=abc", "whole number"),
])
def test_bad_addresses_show_a_clear_message(server, browser, address, says):
    url, _ = server
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(url + address)
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert says in page.inner_text("#status") and page.locator("li.result").count() == 0
    assert errors == []


def test_empty_library_says_what_to_do(tmp_path, browser):
    from atae.library import Library

    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=LabelWordTower())
    url, stop = _serve(lib)
    try:
        page = _page(browser, [])
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#status').textContent.includes('atae index')")
        assert "empty" in page.inner_text("#status")
    finally:
        stop()
        lib.close()
