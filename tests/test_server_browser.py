"""The search page in real headless Chromium: type a query, see results, move with the keyboard, play."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from library_fakes import FREQS, BandTower, IdentityModel, WordTower, write_tone

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


@pytest.fixture
def server(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (`make browser` installs it)")
    pytest.importorskip("playwright.sync_api")
    uvicorn = pytest.importorskip("uvicorn")
    from atae.library import Library
    from atae.server.app import create_app

    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=3.0, sr=16000)
    write_tone(d / "field" / "recording.wav", None, seconds=60.0, sr=16000, event=(41.0, 3.0, FREQS["high"]))
    lib = Library.open(
        tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(), model=IdentityModel()
    )
    lib.add([d])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(lib), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", d
    srv.should_exit = True
    th.join(timeout=10)
    lib.close()


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
            first_path = page.inner_text("li.result .path")
            assert first_path.endswith("mid.wav")
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
            assert "recording.wav" in li.locator(".path").inner_text()
            li.focus()
            page.keyboard.press(" ")
            page.wait_for_function(
                "() => { const a = document.querySelector('li.result.selected audio');"
                " return a && !a.paused && a.currentTime >= 35; }",
                timeout=15000,
            )
            page.screenshot(path=str(tmp_path / "long-match.png"))

            # the scorer selector: all three usable here (a model and a tagging tower), adapter by default
            page.wait_for_function("!document.querySelector('#scorer option[value=hybrid]').disabled")
            assert page.eval_on_selector(
                "#scorer", "s => [s.value, [...s.options].filter(o => !o.disabled).map(o => o.value)]"
            ) == ["adapter", ["adapter", "bridge", "hybrid"]]
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
            assert page.inner_text("li.result .path").endswith("low.wav")

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
            assert page.inner_text("li.result .path").endswith("high.wav")
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "search-page.png").stat().st_size > 10_000
