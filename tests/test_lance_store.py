"""A library whose vectors live in LanceDB (``--store lance``) against the same library on FAISS: the same
results, filters pushed into the search, incremental updates, a damaged table rebuilt, the IVF-PQ index,
the web page on top."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("lancedb", reason='LanceDB is the optional extra: pip install "atae[distributed]"')

from atae.errors import LibraryError  # noqa: E402
from atae.library import Library  # noqa: E402
from library_fakes import BandTower, IdentityModel, WordTower, write_tone_mix  # noqa: E402

QUERIES = ("high", "low", "mid", "high low")


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    d = tmp_path_factory.mktemp("sounds")
    for i in range(6):
        write_tone_mix(d / ("long" if i % 2 else "short") / f"m{i}.wav", 40.0 if i % 2 else 12.0, seed=i)
    return d


def _open(path, store, **kw):
    return Library.open(path, create=True, audio_tower=BandTower(), text_tower=WordTower(),
                        model=IdentityModel(), long_s=15.0, window_s=4.0, hop_s=2.0, store=store, **kw)


def _same(a, b):
    assert [(r.path, r.segment_id, r.start_s) for r in a] == [(r.path, r.segment_id, r.start_s) for r in b]
    np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)


def test_lance_library_answers_like_the_faiss_one_with_filters(tmp_path, sounds):
    faiss_lib, lance_lib = _open(tmp_path / "f", "faiss"), _open(tmp_path / "l", "lance")
    for lib in (faiss_lib, lance_lib):
        lib.add([sounds])
    assert lance_lib.stats()["store"] == "lance" and lance_lib.index.kind == "lance"
    assert list(lance_lib.index.ids()) == list(lance_lib.db.segment_ids())
    filters = [{}, {"max_duration": 20}, {"min_duration": 20}, {"glob": "*/long/*"}, {"glob": "m1.wav"},
               {"span": (0, 10)}, {"min_duration": 20, "span": (10, 30)}]
    for q in QUERIES:
        for f in filters:
            _same(lance_lib.search(q, k=4, **f), faiss_lib.search(q, k=4, **f))
        _same(lance_lib.search(audio=sounds / "short" / "m0.wav", k=3),
              faiss_lib.search(audio=sounds / "short" / "m0.wav", k=3))
    # the prefilter runs inside the table: a filtered search still fills k from the matching files only
    hits = lance_lib.search("high", k=10, glob="*/long/*")
    assert len(hits) == 3 and all("/long/" in r.path for r in hits)
    faiss_lib.close()
    lance_lib.close()


def test_incremental_updates_a_damaged_table_and_switching_stores(tmp_path, sounds):
    src = tmp_path / "src"
    shutil.copytree(sounds, src)
    lib = _open(tmp_path / "lib", "lance")
    lib.add([src])
    before = lib.search("high", k=6)
    (src / "long" / "m1.wav").unlink()
    rep = lib.add([src])
    assert rep.removed == 1
    assert list(lib.index.ids()) == list(lib.db.segment_ids())  # the table follows SQLite
    assert all(not r.path.endswith("m1.wav") for r in lib.search("high", k=6))
    lib.close()
    # a half-written or damaged table is a cache: the next open rebuilds it from SQLite
    table = next((tmp_path / "lib").glob("vectors-*.lance"))
    for p in table.rglob("*"):
        if p.is_file():
            p.write_bytes(b"damaged")
    lib = _open(tmp_path / "lib", "lance")
    assert list(lib.index.ids()) == list(lib.db.segment_ids())
    got = lib.search("high", k=5)
    assert got and [r.path for r in got] == [r.path for r in before if not r.path.endswith("m1.wav")][:5]
    lib.close()
    # a table another version of atae wrote (another layout) is rebuilt the same way
    import lancedb
    import pyarrow as pa

    table = next((tmp_path / "lib").glob("vectors-*.lance"))
    shutil.rmtree(table)
    old = pa.table({"id": pa.array([1, 2], pa.int64()),
                    "vector": pa.array([[0.0] * lib.index.dim] * 2, pa.list_(pa.float32(), lib.index.dim))})
    lancedb.connect(str(table)).create_table("vectors", data=old)
    lib = _open(tmp_path / "lib", "lance")
    assert list(lib.index.ids()) == list(lib.db.segment_ids())
    _same(lib.search("high", k=5), got)
    lib.close()
    # the same library moved to FAISS and back: the vectors are rebuilt, the answers stay
    lib = _open(tmp_path / "lib", "faiss")
    _same(lib.search("high", k=5), got)
    assert not list((tmp_path / "lib").glob("vectors-*.lance"))  # the old store's files are gone
    lib.close()


def test_ivf_pq_index_finds_each_segment_s_own_vector(tmp_path, sounds, monkeypatch):
    """Past INDEX_MIN the table is searched through IVF-PQ + refine: a stored vector as the query must come
    back first (what `more like this` and exact duplicates rely on)."""
    from atae.library import lance_vectors

    monkeypatch.setattr(lance_vectors, "INDEX_MIN", 50)
    lib = _open(tmp_path / "lib", "lance")
    lib.add([sounds])
    assert lib.index._indexed()
    ids = lib.db.segment_ids()
    vecs = lib.index.vectors(ids)
    for sid, v in zip(ids[::7], vecs[::7], strict=True):
        _, hits = lib.index.search(v, 3)
        assert hits[0] == sid
    lib.close()


def test_the_page_searches_a_lance_library(tmp_path, sounds):
    from fastapi.testclient import TestClient

    from atae.server.app import create_app

    lib = _open(tmp_path / "lib", "lance")
    lib.add([sounds])
    with TestClient(create_app(lib), base_url="http://127.0.0.1:8000") as client:
        r = client.get("/api/search", params={"q": "high", "k": 3, "scorer": "adapter", "max_duration": 20})
        assert r.status_code == 200
        res = r.json()["results"]
        assert len(res) == 3 and all(x["duration"] <= 20 for x in res)
    lib.close()


def test_lance_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lance(name, *args, **kwargs):
        if name == "lancedb" or name.startswith("lancedb."):
            raise ImportError("No module named 'lancedb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lance)
    with pytest.raises(LibraryError, match=r"atae\[distributed\]"):
        _open(tmp_path / "lib", "lance")
    with pytest.raises(LibraryError, match="unknown store"):
        _open(tmp_path / "other", "sqlite")


def test_a_reader_of_a_lance_library_sees_new_rows_and_never_writes_them_again(tmp_path, sounds):
    """`atae serve` beside `atae index`: the page's library reads the table the indexer writes; after each
    index run it answers with the new files, and the table holds every segment once."""
    src = tmp_path / "src"
    (src / "short").mkdir(parents=True)
    for name in ("m0.wav", "m2.wav"):
        shutil.copy(sounds / "short" / name, src / "short" / name)
    writer = _open(tmp_path / "lib", "lance")
    writer.add([src])
    reader = Library.open(tmp_path / "lib", text_tower=WordTower(), model=IdentityModel())
    assert len(reader.search("high", k=10)) == 2
    shutil.copytree(sounds / "long", src / "long")
    writer.add([src])  # while the reader stays open
    got = reader.search("high", k=10)
    assert sorted(r.path for r in got) == sorted(str(p) for p in src.rglob("*.wav"))
    import lancedb

    table = lancedb.connect(str(next((tmp_path / "lib").glob("vectors-*.lance")))).open_table("vectors")
    ids = table.to_arrow().column("id").to_pylist()
    assert sorted(ids) == list(writer.db.segment_ids())  # each segment once
    reader.close()
    writer.close()


def test_a_reader_while_the_indexer_rebuilds_the_table(tmp_path, sounds):
    """`atae index` rebuilding a Lance table (its folder gone, the writer lock held) under a reader: what
    needs the vectors says so in one line (the page answers 503), the tags still search, and once the
    indexer is done the reader answers as before."""
    from atae.library.lock import WriterLock

    writer = _open(tmp_path / "lib", "lance")
    writer.add([sounds / "short"])
    writer.close()
    reader = Library.open(tmp_path / "lib", text_tower=WordTower(), model=IdentityModel())
    before = {s: reader.search("high", k=3, scorer=s) for s in ("adapter", "bridge")}
    ids = reader.segments_at(before["adapter"][0].path)
    lock = WriterLock(tmp_path / "lib")
    assert lock.acquire()  # an indexer runs ...
    for table in (tmp_path / "lib").glob("vectors-*.lance"):
        shutil.rmtree(table)  # ... and has not written the new table yet
    with reader.db.transaction():
        reader.db.set_meta("touched", "1")  # a new generation: the reader looks again
    for run in (lambda: reader.search("high", k=3, scorer="adapter"),
                lambda: reader.search("high", k=3, scorer="hybrid"),
                lambda: reader.similar(ids, k=2)):
        with pytest.raises(LibraryError, match="being rebuilt by `atae index`"):
            run()
    _same(reader.search("high", k=3, scorer="bridge"), before["bridge"])
    lock.release()
    _same(reader.search("high", k=3, scorer="adapter"), before["adapter"])
    reader.close()
