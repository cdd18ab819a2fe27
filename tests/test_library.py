"""The sound library: indexing (incremental, bad files, long files), search, consistency, locking."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest

from atae.errors import LibraryError, QueryError
from atae.library import Library
from atae.library.lock import WriterLock
from atae.query import clean_query
from library_fakes import FREQS, BandTower, IdentityModel, WordTower, write_tone


def _open(root, **kw):
    kw.setdefault("audio_tower", BandTower())
    kw.setdefault("text_tower", WordTower())
    kw.setdefault("model", IdentityModel())
    return Library.open(root, create=True, **kw)


@pytest.fixture
def sounds(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    write_tone(d / "sub" / "deep" / "also_low.flac", FREQS["low"], seconds=3.0)
    return d


def _bad_files(d):
    (d / "bad").mkdir(parents=True, exist_ok=True)
    (d / "bad" / "empty.wav").write_bytes(b"")
    (d / "bad" / "text.wav").write_text("this is not audio\n" * 50)
    (d / "bad" / "noise.ogg").write_bytes(np.random.default_rng(0).bytes(5000))
    good = write_tone(d / "bad" / "cut_source.wav", 1000.0, seconds=2.0)
    data = good.read_bytes()
    good.unlink()
    (d / "bad" / "truncated.wav").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("not indexed: extension not in the allow-list")


def test_index_and_text_search(tmp_path, sounds):
    lib = _open(tmp_path / "lib")
    rep = lib.add([sounds])
    assert (rep.new, rep.changed, rep.removed, rep.failed) == (4, 0, 0, [])
    for word in FREQS:
        res = lib.search(word, k=10)
        assert res[0].path.endswith(f"{word}.wav") or (
            word == "low" and res[0].path.endswith("also_low.flac")
        )
        assert [r.rank for r in res] == list(range(1, len(res) + 1))
        assert all(res[i].score >= res[i + 1].score for i in range(len(res) - 1))
    low = {r.path.rsplit("/", 1)[-1] for r in lib.search("low", k=2)}
    assert low == {"low.wav", "also_low.flac"}
    # one result per file, each file at most once
    res = lib.search("mid", k=10)
    assert len({r.file_id for r in res}) == len(res) == 4
    assert res[0].start_s == 0.0 and res[0].end_s == pytest.approx(2.0)


def test_bad_files_are_reported_not_fatal(tmp_path, sounds):
    _bad_files(sounds)
    lib = _open(tmp_path / "lib")
    rep = lib.add([sounds])
    assert rep.new == 4
    failed = dict((os.path.basename(p), why) for p, why in rep.failed)
    assert set(failed) == {"empty.wav", "text.wav", "noise.ogg", "truncated.wav"}
    assert "empty" in failed["empty.wav"] and "truncated" in failed["truncated.wav"]
    assert all(why for why in failed.values())
    assert {os.path.basename(p) for p, _ in lib.failed()} == set(failed)
    # failed files are remembered and not retried until they change
    rep2 = lib.add([sounds])
    assert rep2.failed == [] and rep2.previously_failed == 4 and rep2.unchanged == 8
    assert lib.search("high")[0].path.endswith("high.wav")


def test_incremental_changed_removed_moved_touched(tmp_path, sounds):
    tower = BandTower()
    lib = _open(tmp_path / "lib", audio_tower=tower)
    lib.add([sounds])
    calls = tower.calls
    # untouched: nothing encoded
    rep = lib.add([sounds])
    assert (rep.new, rep.changed, rep.unchanged, rep.removed) == (0, 0, 4, 0) and tower.calls == calls
    # changed content: mid.wav becomes a high tone
    write_tone(sounds / "mid.wav", FREQS["high"], seconds=2.0, seed=5)
    os.utime(sounds / "mid.wav", ns=(1, 10**18))
    # touched only: same bytes, new mtime -> unchanged (hash equal)
    os.utime(sounds / "high.wav", ns=(1, 10**18 + 5))
    # removed
    (sounds / "sub" / "deep" / "also_low.flac").unlink()
    # moved: same bytes at a new path -> no re-encode
    shutil.move(sounds / "low.wav", sounds / "renamed_low.wav")
    # new
    write_tone(sounds / "new_mid.wav", FREQS["mid"], seconds=1.0)
    rep = lib.add([sounds])
    assert (rep.new, rep.changed, rep.unchanged, rep.removed, rep.moved) == (1, 1, 1, 1, 1)
    assert tower.calls == calls + 2
    assert lib.search("mid", k=1)[0].path.endswith("new_mid.wav")
    top_high = {os.path.basename(r.path) for r in lib.search("high", k=2)}
    assert top_high == {"high.wav", "mid.wav"}
    assert lib.search("low", k=1)[0].path.endswith("renamed_low.wav")
    assert lib.stats()["files"] == 4


def test_long_file_reports_matching_time_span(tmp_path):
    d = tmp_path / "long"
    # 2-minute recording: faint noise with a 3-second high tone at 61 s
    write_tone(d / "field.wav", None, seconds=120.0, event=(61.0, 3.0, FREQS["high"]))
    write_tone(d / "short_mid.wav", FREQS["mid"], seconds=5.0)
    lib = _open(tmp_path / "lib")
    rep = lib.add([d])
    # windows of 10 s every 5 s over 120 s: starts 0, 5, ..., 110 -> 23 windows, plus the short file
    assert rep.segments_added == 23 + 1
    r = lib.search("high", k=1)[0]
    assert r.path.endswith("field.wav") and r.duration == pytest.approx(120.0)
    # the best window must contain the whole event [61, 64]: windows [55, 65] or [60, 70]
    assert r.start_s <= 61.0 and r.end_s >= 64.0 and r.end_s - r.start_s == pytest.approx(10.0)


def test_query_by_example_and_filters(tmp_path, sounds):
    lib = _open(tmp_path / "lib")
    lib.add([sounds])
    probe = write_tone(tmp_path / "q.wav", FREQS["mid"], seconds=1.5, sr=16000, seed=9)
    res = lib.search(audio=probe, k=2)
    assert res[0].path.endswith("mid.wav") and res[0].score > 0.95
    # example given as (wave, sr)
    import soundfile as sf

    wave, sr = sf.read(probe, dtype="float32")
    assert lib.search(audio=(wave, sr), k=1)[0].path.endswith("mid.wav")
    # duration filter keeps only the 3 s file; glob on name or path
    assert [os.path.basename(r.path) for r in lib.search("low", min_duration=2.5)] == ["also_low.flac"]
    assert all(r.duration <= 2.0 for r in lib.search("low", max_duration=2.0))
    assert [os.path.basename(r.path) for r in lib.search("mid", glob="*.flac")] == ["also_low.flac"]
    assert len(lib.search("mid", glob="*/sub/*")) == 1
    assert lib.search("mid", glob="*.mp3") == []


@pytest.mark.parametrize("q", ["", "   \t\n ", "x" * 100_000, "door\x00creak", "bell \x1b[31m", "a\x7fb"])
def test_bad_queries_raise_query_error(tmp_path, sounds, q):
    lib = _open(tmp_path / "lib")
    lib.add([sounds])
    with pytest.raises(QueryError):
        lib.search(q)


def test_query_normalisation():
    assert clean_query("  a\tdoor\n creaks  ") == "a door creaks"
    assert clean_query("ü" * 5000) == "ü" * 5000  # 10,000 bytes: at the limit
    with pytest.raises(QueryError, match="bytes"):
        clean_query("ü" * 5001)
    with pytest.raises(QueryError):
        clean_query(None)


def test_text_search_without_model_is_a_clear_error_but_example_works(tmp_path, sounds):
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower())
    lib.add([sounds])
    with pytest.raises(QueryError, match="train a model"):
        lib.search("high")
    assert lib.search(audio=sounds / "high.wav", k=1)[0].path.endswith("high.wav")
    # a model added later re-embeds the stored raw vectors without running the tower again
    calls = lib.audio_tower.calls
    lib.set_model(IdentityModel())
    lib._text_tower = WordTower()
    assert lib.search("high", k=1)[0].path.endswith("high.wav")
    assert lib.audio_tower.calls == calls
    assert len(list(lib.root.glob("vectors-*.faiss"))) == 1


def test_tags_are_stored(tmp_path, sounds):
    lib = _open(tmp_path / "lib")
    lib.add([sounds])
    ids, tags = lib.db.tags_matrix()
    assert tags.shape == (4, 527) and len(ids) == 4
    assert np.all(tags[:, 16:] == 0) and np.all(tags[:, :16] > 0)


def test_index_file_is_rebuilt_or_reconciled(tmp_path, sounds):
    root = tmp_path / "lib"
    lib = _open(root)
    lib.add([sounds / "high.wav", sounds / "mid.wav"])
    idx = next(root.glob("vectors-*.faiss"))
    stale = idx.read_bytes()
    lib.add([sounds])
    lib.close()
    # stale index (a crash after SQLite committed but before the index was written)
    idx.write_bytes(stale)
    lib = _open(root)
    assert lib.index.ntotal == 4 and lib.search("low", k=1)[0].path.rsplit("/", 1)[-1] in (
        "low.wav",
        "also_low.flac",
    )
    lib.close()
    # corrupt and missing index files are rebuilt from SQLite
    idx.write_bytes(b"garbage")
    lib = _open(root)
    assert lib.index.ntotal == 4
    lib.close()
    idx.unlink()
    lib = _open(root)
    assert lib.index.ntotal == 4 and lib.search("high", k=1)[0].path.endswith("high.wav")


def test_hnsw_index_with_removals(tmp_path, sounds):
    lib = _open(tmp_path / "lib", index="hnsw")
    lib.add([sounds])
    assert lib.index.kind == "hnsw"
    (sounds / "high.wav").unlink()
    lib.add([sounds])
    res = lib.search("high", k=10)
    assert len(res) == 3 and all(not r.path.endswith("high.wav") for r in res)


def test_second_writer_refuses_clearly(tmp_path, sounds):
    lib = _open(tmp_path / "lib")
    other = WriterLock(tmp_path / "lib")
    other.acquire()
    try:
        with pytest.raises(LibraryError, match="being updated"):
            lib.add([sounds])
    finally:
        other.release()
    assert lib.add([sounds]).new == 4


def test_file_changing_or_vanishing_while_indexing(tmp_path, sounds):
    victim = sounds / "mid.wav"
    vanish = sounds / "high.wav"
    state = {"n": 0}

    def hook(wave):
        state["n"] += 1
        if state["n"] == 1:  # while the first file is encoded, alter one and delete another
            write_tone(victim, 700.0, seconds=4.0)
            vanish.unlink()

    lib = _open(tmp_path / "lib", audio_tower=BandTower(hook=hook))
    rep = lib.add([sounds])
    skipped = {os.path.basename(p): why for p, why in rep.skipped}
    # high.wav and mid.wav come after also_low.flac? order is sorted per folder: the first encoded file is
    # high.wav itself, so it is the one that vanishes during its own encoding
    assert "high.wav" in skipped and "disappeared" in skipped["high.wav"]
    assert "mid.wav" in skipped and "changed" in skipped["mid.wav"]
    assert rep.new == 2
    rep2 = lib.add([sounds])
    assert rep2.new == 1 and rep2.unchanged == 2  # mid.wav picked up on the next run


def test_open_missing_library_and_wrong_encoder(tmp_path, sounds):
    with pytest.raises(LibraryError, match="atae index"):
        Library.open(tmp_path / "nope")
    lib = _open(tmp_path / "lib")
    lib.close()
    with pytest.raises(LibraryError, match="bands"):
        Library.open(tmp_path / "lib", audio_encoder="aisfx", audio_tower=BandTower())
    sqlite3.connect(tmp_path / "junk.sqlite").close()


def test_symlink_loops_and_duplicates(tmp_path, sounds):
    (sounds / "sub" / "loop").symlink_to(sounds, target_is_directory=True)
    (sounds / "alias.wav").symlink_to(sounds / "high.wav")
    (sounds / "dangling.wav").symlink_to(tmp_path / "missing.wav")
    lib = _open(tmp_path / "lib")
    rep = lib.add([sounds])
    assert rep.new == 4 and rep.failed == []


def test_scorer_seam_custom_object(tmp_path, sounds):
    lib = _open(tmp_path / "lib")
    lib.add([sounds])

    class ByPath:
        """Scores every segment by the reverse alphabetical order of its file name."""

        def score(self, library, text):
            rows = library.db.conn.execute(
                "SELECT s.id, f.path FROM segments s JOIN files f ON f.id = s.file_id"
            ).fetchall()
            names = sorted(os.path.basename(p) for _, p in rows)
            return (
                np.array([r[0] for r in rows]),
                np.array([-names.index(os.path.basename(p)) for _, p in rows], dtype=np.float32),
            )

    res = lib.search("anything at all", scorer=ByPath(), k=3)
    assert [os.path.basename(r.path) for r in res] == ["also_low.flac", "high.wav", "low.wav"]
    with pytest.raises(QueryError, match="unknown scorer"):
        lib.search("x", scorer="nonsense")
    with pytest.raises(QueryError, match="query by example"):
        lib.search(audio=sounds / "low.wav", scorer=ByPath())


class _NoTags(BandTower):
    has_tags = False

    def encode(self, wave):
        enc = super().encode(wave)
        enc.tags = None
        return enc


def test_bridge_scorer_needs_a_tagging_tower(tmp_path, sounds):
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=_NoTags())
    lib.add([sounds])
    with pytest.raises(QueryError, match="no AudioSet head"):
        lib.search("a dog barks", scorer="bridge")


def test_unreadable_file_is_reported_and_retried(tmp_path, sounds, monkeypatch):
    from atae.library import indexer

    real = indexer.content_hash
    target = str(sounds / "mid.wav")

    def denied(path):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(indexer, "content_hash", denied)
    lib = _open(tmp_path / "lib")
    rep = lib.add([sounds])
    assert rep.new == 3 and [(p, "Permission denied" in why) for p, why in rep.failed] == [(target, True)]
    # permissions fixed: picked up without any mtime change
    monkeypatch.setattr(indexer, "content_hash", real)
    rep = lib.add([sounds])
    assert rep.new == 1 and rep.failed == []


def test_refuses_to_create_a_library_inside_a_foreign_folder(tmp_path, sounds):
    with pytest.raises(LibraryError, match="not an atae library"):
        _open(sounds)
    assert not (sounds / "library.sqlite").exists()


def test_span_filter_keeps_segments_inside_the_given_seconds(tmp_path):
    """span=(a, b): only segments lying inside seconds [a, b] of their file; the same rule as a loop over
    the stored segment spans."""
    from library_fakes import IdentityModel, write_tone_mix

    for i in range(3):
        write_tone_mix(tmp_path / "s" / f"m{i}.wav", 40.0, seed=i)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel())
    lib.add([tmp_path / "s"])
    res = lib.search("high", k=3, span=(0, 20))
    assert len(res) == 3 and all(r.start_s >= 0 and r.end_s <= 20 for r in res)
    spans = lib.db.conn.execute("SELECT start_s, end_s FROM segments").fetchall()
    assert any(b > 20 for _, b in spans)  # the filter had something to leave out
    for bad in ((5, 5), (-1, 3), (10, 2)):
        with pytest.raises(QueryError, match="span"):
            lib.search("high", span=bad)
    lib.close()


class _WindowedBands(BandTower):
    """BandTower recording a window option, as the real towers do."""

    @property
    def info(self):
        from atae.towers.base import TowerInfo

        return TowerInfo("bands", "audio", 16, "fake-sha", 8000, {"window_s": None})


def test_a_model_of_other_features_is_refused(tmp_path, sounds):
    """A model trained on another tower's features, or on the same tower cut another way, would rank
    junk: the library refuses it and names both feature kinds."""
    from dataclasses import replace

    from atae.errors import ModelError

    lib = Library.open(tmp_path / "lib", create=True, audio_tower=_WindowedBands())
    lib.add([sounds])
    stored = lib.stored_tower_info
    for other in (replace(stored, weights_sha256="other-sha"), replace(stored, options={"window_s": 1.0})):
        model = IdentityModel()
        model.audio_info = other
        with pytest.raises(ModelError, match="trained on bands features") as e:
            lib.set_model(model)
        assert other.key() in str(e.value) and stored.key() in str(e.value)
    model = IdentityModel()
    model.audio_info = stored
    lib.set_model(model)  # the same features: accepted
    lib.close()
