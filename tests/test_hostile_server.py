"""The web server against hostile requests: Unicode digits as ids, long uploads, and web pages of other
sites (cross-origin posts, DNS rebinding)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import soundfile as sf

from library_fakes import FREQS, SR, BandTower, IdentityModel, WordTower, write_tone

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from atae.library import Library  # noqa: E402
from atae.server.app import create_app  # noqa: E402

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture
def lib(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel())
    lib.add([d])
    yield lib
    lib.close()


def _client(lib, **kw):
    return TestClient(create_app(lib, **kw), raise_server_exceptions=False, base_url=LOCAL)


# --- ids: ASCII digits only ------------------------------------------------------------------

@pytest.mark.parametrize("ident", ["²", "١", "１", "٣", "1²", "𝟙"])
def test_unicode_digits_are_not_ids(lib, ident):
    with _client(lib) as c:
        assert c.get("/api/audio/1").status_code == 200  # the file with id 1 exists
        for url in (f"/api/audio/{ident}", f"/api/waveform/{ident}.png"):
            r = c.get(url)
            assert r.status_code == 404 and r.json()["error"].startswith("no indexed sound with id")


# --- a long example: the first 30 s, decoded and encoded outside the library lock ------------

RUMBLE = 125.0  # band 0 of the fake tower, below every tone of FREQS


def _long_example(seconds: float, rate: int = 1000) -> bytes:
    """FLAC at 1 kHz (a small upload for its length): 30 s of the 'low' tone, then a rumble."""
    t = np.arange(int(seconds * rate)) / rate
    f = np.where(t < 30.0, FREQS["low"], RUMBLE)
    x = (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC")
    return buf.getvalue()


def test_a_long_upload_uses_its_first_30_seconds(lib, tmp_path):
    rumble = write_tone(tmp_path / "more" / "rumble.wav", RUMBLE, seconds=2.0)
    lib.add([rumble.parent])
    data = _long_example(60 * 60)  # an hour: 30 s of the low tone, then 59.5 minutes of rumble
    assert len(data) < 4_000_000
    with _client(lib, max_upload_bytes=5_000_000) as c:
        r = c.post("/api/search", files={"file": ("hour.flac", data, "audio/flac")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["path"].endswith("low.wav")  # the whole hour would be the rumble


def test_other_searches_run_while_an_upload_is_encoded(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    encoding, searched = threading.Event(), {}

    def while_encoding(wave):
        if len(wave) > 10 * SR:  # the upload, not the indexed files
            encoding.set()
            t = threading.Thread(target=lambda: searched.setdefault("res", lib.search("mid", k=1)))
            t.start()
            t.join(timeout=60)  # a search blocked on the library lock would still be waiting
            searched["done"] = not t.is_alive()

    tower = BandTower()
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=tower, text_tower=WordTower(),
                       model=IdentityModel())
    lib.add([d])
    tower.hook = while_encoding
    with _client(lib, max_upload_bytes=5_000_000) as c:
        r = c.post("/api/search", files={"file": ("two-minutes.flac", _long_example(120), "audio/flac")})
    assert r.status_code == 200 and encoding.is_set()
    assert searched["done"] and searched["res"][0].path.endswith("mid.wav")
    lib.close()


# --- other sites: Host and Origin ------------------------------------------------------------

def test_dns_rebinding_host_is_refused(lib):
    with _client(lib) as c:
        for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example", "localhost.evil:8000"):
            r = c.get("/api/search", params={"q": "low"}, headers={"Host": host})
            assert r.status_code == 400 and "--allow-host" in r.json()["fix"], host
            assert c.get("/api/audio/1", headers={"Host": host}).status_code == 400
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert c.get("/api/search", params={"q": "low"}, headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_a_wildcard_bind(lib):
    with _client(lib, host="0.0.0.0", allow_hosts=["sounds.lan"]) as c:
        for host, status in (("192.168.1.7:8000", 200), ("[fe80::1]:8000", 200), ("sounds.lan:8000", 200),
                             ("evil.example", 400), ("localhost", 200)):
            assert c.get("/api/stats", headers={"Host": host}).status_code == status, host
    with _client(lib, host="192.168.1.7") as c:
        assert c.get("/api/stats", headers={"Host": "192.168.1.7:8000"}).status_code == 200
        assert c.get("/api/stats", headers={"Host": "10.0.0.1:8000"}).status_code == 400


def test_cross_origin_posts_and_embeds_are_refused(lib, tmp_path):
    example = write_tone(tmp_path / "q.wav", FREQS["mid"], seconds=1.0).read_bytes()

    def post(**headers):
        return c.post("/api/search", files={"file": ("q.wav", example, "audio/wav")}, headers=headers)

    with _client(lib) as c:
        for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8000"):
            r = post(Origin=origin)
            assert r.status_code == 403 and "cross-origin" in r.json()["error"], origin
        assert post(**{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}).status_code == 403
        r = c.get("/api/audio/1", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
        assert r.status_code == 403
        # the page itself, and a link followed from another site to the page, still work
        assert post(Origin=LOCAL, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert post().status_code == 200  # a script (curl) sends no Origin
        r = c.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
        assert r.status_code == 200
