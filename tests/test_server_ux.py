"""The JSON API's result details and "more like this", and a server that is ready before its first search."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import pytest

from library_fakes import FREQS, BandTower, IdentityModel, LabelWordTower, write_tone

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from atae.library import Library  # noqa: E402
from atae.server.app import create_app  # noqa: E402


@pytest.fixture
def lib(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    write_tone(d / "again" / "mid.wav", FREQS["mid"], seconds=3.0, seed=5)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=LabelWordTower(),
                       model=IdentityModel(LabelWordTower()))
    lib.add([d])
    yield lib
    lib.close()


@pytest.fixture
def client(lib):
    with TestClient(create_app(lib), raise_server_exceptions=False, base_url="http://127.0.0.1:8000") as c:
        yield c


def test_results_name_the_file_and_say_why(client, lib):
    r = client.get("/api/search", params={"q": "children shouting", "k": 2, "scorer": "bridge"}).json()
    top = r["results"][0]
    assert top["file_name"] == "high.wav" and top["folder"] == os.path.dirname(top["path"])
    assert top["tags"][0]["label"] == "Children shouting" and top["tags"][0]["matched"] is True
    assert top["missing"] is False
    # the trained model ranks too, and its results carry the same explanation
    top = client.get("/api/search", params={"q": "high", "k": 1, "scorer": "adapter"}).json()["results"][0]
    assert top["file_name"] == "high.wav" and [t["label"] for t in top["tags"] if t["matched"]] == [
        "Children shouting"]


def test_best_scorer_is_offered_first(client):
    s = client.get("/api/stats").json()["scorers"]
    assert s["default"] == "hybrid" and s["available"] == ["adapter", "bridge", "hybrid"]


def test_more_like_this(client, lib):
    hit = client.get("/api/search", params={"q": "mid", "k": 1, "scorer": "adapter"}).json()["results"][0]
    r = client.get(f"/api/similar/{hit['segment_id']}", params={"k": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["like"]["path"] == hit["path"] and body["like"]["segment_id"] == hit["segment_id"]
    paths = [x["path"] for x in body["results"]]
    assert len(paths) == 2 and hit["path"] not in paths
    assert os.path.basename(paths[0]) == "mid.wav"  # the other mid tone (one in each folder)
    assert body["results"][0]["tags"][0]["matched"]  # the tag the two share


@pytest.mark.parametrize("bad, status, says", [
    ("424242", 404, "no indexed sound has the segment id 424242"),
    ("abc", 400, "whole number"),
    ("1.5", 400, "whole number"),
    ("-1", 400, "whole number"),
    ("9" * 30, 400, "whole number"),
    ("\u00b2", 400, "whole number"),  # a Unicode digit: str.isdigit() accepts it, int() does not
])
def test_more_like_this_bad_ids(client, bad, status, says):
    r = client.get(f"/api/similar/{bad}")
    assert r.status_code == status and says in r.json()["error"] and "Traceback" not in r.text
    assert r.headers["content-type"].startswith("application/json")


def test_bad_k_for_more_like_this(client, lib):
    sid = lib.segments_at(lib.search("low", k=1)[0].path)[0]
    r = client.get(f"/api/similar/{sid}", params={"k": "lots"})
    assert r.status_code == 400 and "k must" in r.json()["error"]


def test_a_deleted_file_is_marked_missing(client):
    hit = client.get("/api/search", params={"q": "low", "k": 1, "scorer": "adapter"}).json()["results"][0]
    os.unlink(hit["path"])
    again = client.get("/api/search", params={"q": "low", "k": 1, "scorer": "adapter"}).json()["results"][0]
    assert again["path"] == hit["path"] and again["missing"] is True


def _serve(lib, lines):
    from atae.server.run import make_server

    srv = make_server(lib, "127.0.0.1", 0, log=lines.append, warn=lines.append)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not any(x.startswith("ready") for x in lines):
        assert th.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.05)
    return srv, th


def test_server_loads_everything_then_says_ready(lib):
    lines: list[str] = []
    srv, th = _serve(lib, lines)
    try:
        assert lines[0].startswith("atae: 4 files; loading") and not any("warning" in x for x in lines)
        url = lines[-1].split("open ")[1]
        with urllib.request.urlopen(url + "api/search?q=high&k=1&scorer=hybrid", timeout=30) as resp:
            assert resp.status == 200 and b"high.wav" in resp.read()
    finally:
        srv.should_exit = True
        th.join(timeout=10)
