"""Results a user can judge: why each matched (its AudioSet tags, the ones that carried the query marked),
and "more like this" from any result, in the Python API, on the command line and in the JSON API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from atae.cli import main
from atae.library import Library
from atae.library.explain import explain
from atae.towers import registry
from library_fakes import FREQS, BandTower, LabelWordTower, label_freq, write_tone

YELL, WHISPER = 11, 15  # AudioSet label indices (and BandTower bands) of "Yell" and "Whispering"


def test_explain_marks_the_labels_that_carry_the_score():
    from atae.bridge import audioset_labels

    names = audioset_labels()
    tags = np.zeros(527)
    tags[[0, 3, 10, 20, 30, 40, 50]] = [0.9, 0.5, 0.2, 0.8, 0.7, 0.6, 0.55]
    dist = np.zeros(527)
    dist[[3, 10]] = [0.9, 0.1]
    # contributions p * sqrt(t): label 3 0.9 * 0.707 = 0.636, label 10 0.1 * 0.447 = 0.045 (6.6 %)
    shown = explain(dist, tags)
    assert [t["label"] for t in shown] == [names[i] for i in (0, 20, 30, 40, 50, 3)]
    assert [t["label"] for t in shown if t["matched"]] == [names[3]]  # outside the top 5, still shown
    assert shown[0]["prob"] == pytest.approx(0.9)
    dist[[3, 10]] = [0.5, 0.5]  # label 3: 0.354 (61 %), label 10: 0.224 (39 %)
    shown = explain(dist, tags)
    assert [t["label"] for t in shown if t["matched"]] == [names[3], names[10]]
    tags[10] = 0.05  # all of the score, but a sound barely tagged with it: no false reason
    dist[:] = 0
    dist[10] = 1.0
    assert not any(t["matched"] for t in explain(dist, tags))
    assert not any(t["matched"] for t in explain(None, tags))  # an upload: tags shown, nothing marked


@pytest.fixture
def sounds(tmp_path):
    d = tmp_path / "sounds"
    write_tone(d / "yell.wav", label_freq(YELL), seconds=2.0)
    write_tone(d / "whisper.wav", label_freq(WHISPER), seconds=2.0)
    both = write_tone(d / "both.wav", label_freq(YELL), seconds=2.0)
    import soundfile as sf

    x, sr = sf.read(both)
    t = np.arange(len(x)) / sr
    sf.write(both, (x + 0.3 * np.sin(2 * np.pi * label_freq(WHISPER) * t)).astype(np.float32), sr)
    write_tone(d / "low.wav", FREQS["low"], seconds=2.0)
    write_tone(d / "low_again.wav", FREQS["low"], seconds=2.0, seed=7)
    write_tone(d / "long" / "walk.wav", None, seconds=40.0, event=(22.0, 3.0, label_freq(WHISPER)))
    return d


@pytest.fixture
def lib(tmp_path, sounds):
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=LabelWordTower())
    lib.add([sounds])
    yield lib
    lib.close()


def test_tags_say_why_a_result_matched(lib, sounds):
    res = lib.explain(lib.search("yell", k=3, scorer="bridge"), text="yell")
    assert res[0].path == str(sounds / "yell.wav")
    assert res[0].tags[0] == {"label": "Yell", "prob": pytest.approx(1.0, abs=0.01), "matched": True}
    # two sounds asked for: the file holding both wins, and both of its tags are marked
    res = lib.explain(lib.search("yell and whispering", k=3, scorer="bridge"), text="yell and whispering")
    assert res[0].path == str(sounds / "both.wav")
    assert {t["label"] for t in res[0].tags if t["matched"]} == {"Yell", "Whispering"}
    d = res[0].to_dict()
    assert d["file_name"] == "both.wav" and d["folder"] == str(sounds) and d["missing"] is False


def test_more_like_this_leaves_out_the_source_file(lib, sounds):
    res = lib.similar(lib.segments_at(sounds / "low.wav"), k=3)
    assert res[0].path == str(sounds / "low_again.wav")
    assert str(sounds / "low.wav") not in [r.path for r in res]
    # the part of a long recording around 23 s (a whisper at 22-25 s) finds the whisper, not its own file
    seg = lib.segments_at(sounds / "long" / "walk.wav", 23.0)
    assert len(seg) == 1
    res = lib.similar(seg, k=2)
    assert res[0].path == str(sounds / "whisper.wav") and "walk.wav" not in res[1].path
    assert [t["label"] for t in res[0].tags if t["matched"]] == ["Whispering"]  # what the two share
    # more like a whole long file (no time): every window, its file still left out
    assert all("walk.wav" not in r.path for r in lib.similar(lib.segments_at(sounds / "long" / "walk.wav")))


def test_more_like_this_bad_input(lib, sounds, tmp_path):
    from atae.errors import QueryError

    with pytest.raises(QueryError, match="not in the library"):
        lib.segments_at(tmp_path / "elsewhere.wav")
    with pytest.raises(QueryError, match="which is 2.0 s long"):
        lib.segments_at(sounds / "low.wav", 99.0)
    with pytest.raises(QueryError, match="segment id 424242"):
        lib.similar(424242)


@pytest.fixture
def fake_registry(monkeypatch):
    real_a = registry.get_audio_tower

    def audio(name, weights=None, **kw):
        return BandTower() if name == "bands" else real_a(name, weights, **kw)

    monkeypatch.setattr(registry, "get_audio_tower", audio)
    # the CLI's bridge reads queries with MiniLM: the fake stands in for it
    monkeypatch.setattr(registry, "get_text_tower", lambda name, weights=None, **kw: LabelWordTower())


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def test_cli_explain_and_like(tmp_path, sounds, fake_registry):
    db = tmp_path / "clilib"
    code, out = _cli("index", sounds, "--db", db, "--audio-encoder", "bands")
    assert code == 0, out
    code, out = _cli("search", "--db", db, "yell and whispering", "-k", "2", "--explain")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0].split()[2].endswith("both.wav")
    assert lines[1].split("|")[0].strip().startswith("matches: ")
    assert "Yell 0.7" in lines[1] and "Whispering 0.7" in lines[1]
    code, out = _cli("search", "--db", db, "yell", "-k", "1", "--json", "--explain")
    row = json.loads(out)[0]
    assert row["file_name"] == "yell.wav" and row["tags"][0]["label"] == "Yell" and row["tags"][0]["matched"]

    code, out = _cli("search", "--db", db, "--like", sounds / "low.wav", "-k", "1", "--paths-only")
    assert code == 0 and out.strip().splitlines()[-1] == str(sounds / "low_again.wav")
    walk = sounds / "long" / "walk.wav"
    code, out = _cli("search", "--db", db, "--like", f"{walk}@23", "-k", "1", "--json")
    assert code == 0, out
    assert "more like" in out and "@ 0:20.0-0:30.0" in out  # windows centred at 20, 25 s: 25 is nearest
    assert json.loads(out[out.index("["):])[0]["path"] == str(sounds / "whisper.wav")


@pytest.mark.parametrize("like, says", [
    ("elsewhere.wav", "not in the library"),
    ("low.wav@99", "which is 2.0 s long"),
    ("low.wav@-1", "outside this file"),
    ("low.wav@soon", "not a time in seconds"),
])
def test_cli_like_bad_input_is_one_clear_line(tmp_path, sounds, fake_registry, like, says):
    db = tmp_path / "clilib"
    assert _cli("index", sounds, "--db", db, "--audio-encoder", "bands")[0] == 0
    where = sounds if like.startswith("low") else tmp_path
    code, out = _cli("search", "--db", db, "--like", where / like)
    assert code == 2 and says in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_cli_like_refuses_a_text_query_too(tmp_path, sounds, fake_registry):
    db = tmp_path / "clilib"
    assert _cli("index", sounds, "--db", db, "--audio-encoder", "bands")[0] == 0
    code, out = _cli("search", "--db", db, "yell", "--like", sounds / "low.wav")
    assert code == 2 and "--like" in out
