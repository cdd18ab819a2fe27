"""Scorer choice and bad input through the library, `atae search` and the HTTP API: a tower
without an AudioSet head asked for bridge/hybrid, a model from another tower, a query with no words."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atae import bridge as br
from atae.cli import main
from atae.errors import QueryError
from atae.library import Library
from atae.model import AlignedModel
from atae.scoring import EXTRA_HYBRID_GATE, EXTRA_HYBRID_WEIGHT
from atae.towers import registry
from atae.towers.base import TowerInfo
from library_fakes import FREQS, BandTower, IdentityModel, WordTower, write_tone, write_tone_mix

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from atae.server.app import create_app  # noqa: E402

LOCAL = "http://127.0.0.1:8000"  # the server answers only to the host it is bound to


class NoHead(BandTower):
    name = "nohead"
    has_tags = False

    @property
    def info(self) -> TowerInfo:
        return TowerInfo("nohead", "audio", 16, "fake-sha-nohead", 8000, {})

    def encode(self, wave):
        enc = super().encode(wave)
        enc.tags = None
        return enc


class NoHeadModel(IdentityModel):
    def __init__(self):
        super().__init__()
        self.audio_info = NoHead().info


class OtherTowerModel(IdentityModel):
    def __init__(self):
        super().__init__()
        self.audio_info = TowerInfo("other", "audio", 16, "fake-sha-other", 8000, {})


@pytest.fixture(autouse=True)
def fake_towers(monkeypatch):
    real_a, real_t = registry.get_audio_tower, registry.get_text_tower
    towers = {"bands": BandTower, "nohead": NoHead}

    def audio(name, weights=None, **kw):
        return towers[name]() if name in towers else real_a(name, weights, **kw)

    def text(name, weights=None, **kw):  # "minilm": the bridge's default text tower, here a fake
        return WordTower() if name in ("words", "minilm") else real_t(name, weights, **kw)

    monkeypatch.setattr(registry, "get_audio_tower", audio)
    monkeypatch.setattr(registry, "get_text_tower", text)
    monkeypatch.setitem(registry.TEXT_TOWERS, "words", "library_fakes:WordTower")  # a registered name


@pytest.fixture
def sounds(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    return d


def _lib(root, sounds, tower, model=None):
    lib = Library.open(root, create=True, audio_tower=tower, text_tower=WordTower(), model=model)
    lib.add([sounds])
    return lib


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _run_dir(path, audio_info, weight=None) -> str:
    m = AlignedModel(audio_info, WordTower().info, hidden=16, out_dim=16)
    with torch.no_grad():
        for ad in (m.audio_adapter, m.text_adapter):
            for lin in (ad.fc1, ad.fc2):
                lin.weight.copy_(torch.eye(16))
                lin.bias.zero_()
    if weight is not None:
        m.extras[EXTRA_HYBRID_WEIGHT] = weight
    m.save(path)
    return path


def test_tower_without_head_refuses_bridge_and_hybrid_everywhere(tmp_path, sounds):
    lib = _lib(tmp_path / "lib", sounds, NoHead(), NoHeadModel())
    assert lib.scorers()["available"] == ["adapter"]
    for name in ("bridge", "hybrid"):
        with pytest.raises(QueryError, match="no AudioSet head"):
            lib.search("high", scorer=name)
    assert lib.search("high", k=1)[0].path.endswith("high.wav")  # the adapter still works
    with TestClient(create_app(lib), raise_server_exceptions=False, base_url=LOCAL) as c:
        r = c.get("/api/search", params={"q": "high", "scorer": "bridge"})
        assert r.status_code == 400 and "no AudioSet head" in r.json()["error"]
        assert c.get("/api/search", params={"q": "high", "scorer": "nonsense"}).status_code == 400
        st = c.get("/api/stats").json()["scorers"]
        assert st["available"] == ["adapter"] and st["default"] == "adapter"
        assert "no AudioSet head" in st["unavailable"]["bridge"]
    lib.close()
    # through the CLI (a library indexed without a model): bridge refused, and no default scorer at all
    _lib(tmp_path / "bare", sounds, NoHead()).close()
    code, out = _cli("search", "--db", tmp_path / "bare", "high", "--scorer", "bridge")
    assert code == 2 and "no AudioSet head" in out and "Traceback" not in out
    code, out = _cli("search", "--db", tmp_path / "bare", "high")
    assert code == 2 and "no AudioSet head" in out and "Traceback" not in out


def test_cli_default_scorer_is_bridge_without_a_model(tmp_path, sounds):
    _lib(tmp_path / "lib", sounds, BandTower()).close()
    code, out = _cli("search", "--db", tmp_path / "lib", "a high tone", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert len(rows) == 3
    # brute force: WordTower gives zero vectors for label prompts, so the query's distribution over the
    # 527 labels is uniform and each file scores the mean of its stored tags' square roots
    lib = Library.open(tmp_path / "lib")
    exp = {}
    for sid, blob in lib.db.conn.execute("SELECT id, tags FROM segments").fetchall():
        path = lib.db.segment_rows([sid])[sid][1]
        exp[path] = float(np.sqrt(np.frombuffer(blob, np.float16).astype(np.float64)).mean())
    lib.close()
    assert [r["path"] for r in rows] == sorted(exp, key=exp.get, reverse=True)
    # the JSON rounds scores to 6 decimals
    np.testing.assert_allclose([r["score"] for r in rows], sorted(exp.values(), reverse=True), atol=6e-7)
    code, out = _cli("search", "--db", tmp_path / "lib", "high", "--scorer", "hybrid")
    assert code == 2 and "trained model" in out


def test_model_from_another_tower_is_refused(tmp_path, sounds):
    run = _run_dir(tmp_path / "run", TowerInfo("other", "audio", 16, "fake-sha-other", 8000, {}))
    code, out = _cli("index", sounds, "--db", tmp_path / "lib", "--audio-encoder", "bands", "--model", run)
    assert code == 2 and "other" in out and "bands" in out and "Traceback" not in out
    lib = _lib(tmp_path / "lib2", sounds, BandTower(), IdentityModel())
    lib._model = OtherTowerModel()  # e.g. the model folder was swapped for one of another tower
    with pytest.raises(QueryError, match="trained on audio tower 'other'"):
        lib.search("high", scorer="hybrid")
    with TestClient(create_app(lib), raise_server_exceptions=False, base_url=LOCAL) as c:
        r = c.get("/api/search", params={"q": "high", "scorer": "hybrid"})
        assert r.status_code == 400 and "trained on audio tower 'other'" in r.json()["error"]
    lib.close()


@pytest.mark.parametrize("query", ["?!", "... --- ...", "¿¡ — …"])
def test_query_without_words_is_refused(tmp_path, sounds, query):
    lib = _lib(tmp_path / "lib", sounds, BandTower(), IdentityModel())
    for name in ("adapter", "bridge", "hybrid"):
        with pytest.raises(QueryError, match="no words"):
            lib.search(query, scorer=name)
    with TestClient(create_app(lib), raise_server_exceptions=False, base_url=LOCAL) as c:
        for name in ("adapter", "bridge"):
            r = c.get("/api/search", params={"q": query, "scorer": name})
            assert r.status_code == 400 and "no words" in r.json()["error"]
    lib.close()
    _lib(tmp_path / "bare", sounds, BandTower()).close()
    code, out = _cli("search", "--db", tmp_path / "bare", query, "--scorer", "bridge")
    assert code == 2 and "no words" in out and "Traceback" not in out


def _caption_set(tmp_path):
    audio = tmp_path / "ds"
    for name, f in FREQS.items():
        write_tone(audio / f"clip_{name}.wav", f, seconds=1.0)
    c = tmp_path / "captions.csv"
    with open(c, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name in FREQS:
            w.writerow([f"clip_{name}.wav"] + [f"a {name} tone {i}" for i in range(5)])
    return c, audio


def test_dataset_mode_scorers(tmp_path):
    c, audio = _caption_set(tmp_path)
    # weight 1: the hybrid ranks exactly like the adapter (identity adapters: the 'mid' tone first)
    run = _run_dir(tmp_path / "run", BandTower().info, weight=1.0)
    for scorer in ("adapter", "hybrid", "bridge"):
        code, out = _cli("search", run, "mid", "--csv", c, "--audio-dir", audio, "--scorer", scorer, "--json")
        assert code == 0, out
        rows = json.loads(out[out.index("["):])
        assert len(rows) == 3
        if scorer != "bridge":
            assert rows[0]["file_name"] == "clip_mid.wav"
    code, out = _cli("search", run, "?!", "--csv", c, "--audio-dir", audio)
    assert code == 2 and "no words" in out
    nohead = _run_dir(tmp_path / "nohead-run", NoHead().info)
    code, out = _cli("search", nohead, "mid", "--csv", c, "--audio-dir", audio, "--scorer", "bridge")
    assert code == 2 and "no AudioSet head" in out and "Traceback" not in out


def _z(row):
    n = len(row)
    mu = sum(row) / n
    sd = (sum((x - mu) ** 2 for x in row) / n) ** 0.5
    return [(x - mu) / sd for x in row]


def _top_ids(score, ids, n):
    return [int(ids[c]) for c in sorted(range(len(ids)), key=lambda c: (-score[c], ids[c]))[:n]]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_hybrid_through_the_library_equals_brute_force(tmp_path, kind, monkeypatch):
    """HybridScorer.top against every segment scored with loops here: WordTower gives zero label
    embeddings, so the query's label distribution is uniform and b = the mean of a segment's sqrt tags;
    the query "high" is the one-hot of the HIGH band, so a = the segment vector's entry in that band.
    The candidates are the adapter's top HYBRID_CANDIDATES and the bridge's top BRIDGE_CANDIDATES."""
    from atae.library import search
    from atae.library.scorers import HybridScorer

    monkeypatch.setattr(search, "HYBRID_CANDIDATES", 128)
    monkeypatch.setattr(search, "BRIDGE_CANDIDATES", 96)
    for i in range(4):
        write_tone_mix(tmp_path / "sounds" / f"m{i}.wav", 30.0, seed=i)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel(), long_s=2.0, window_s=0.5, hop_s=0.25, index=kind)
    lib.add([tmp_path / "sounds"])
    assert lib.index.kind == kind  # HNSW at this size with efSearch >= 256 visits every vector: exact
    rows = lib.db.conn.execute("SELECT id, tags FROM segments ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows])
    band = int(FREQS["high"] // 250)
    a = [float(v[band]) for v in lib.index.vectors(lib.index.rows_of(ids))]
    b = [sum(float(x) ** 0.5 for x in np.frombuffer(blob, np.float16)) / 527 for _, blob in rows]
    n = len(rows)
    cand = set(_top_ids(a, ids, 128)) | set(_top_ids(b, ids, 96))
    assert len(cand) < n  # the candidate lists leave segments out
    za, zb = _z(a), _z(b)
    for w in (0.0, 0.3, 1.0):
        lib.model.extras = {EXTRA_HYBRID_WEIGHT: w}
        hs = HybridScorer()
        mix = [w * x + (1 - w) * y for x, y in zip(za, zb, strict=True)]
        inside = [c for c in range(n) if int(ids[c]) in cand]
        want = sorted(inside, key=lambda c: (-mix[c], c))[:7]
        got, sc = hs.top(lib, "high", 7)
        assert list(got) == [rows[c][0] for c in want]
        np.testing.assert_allclose(sc, [mix[c] for c in want], rtol=1e-4, atol=1e-4)
        d_ids, d_sc = hs.score(lib, "high")  # the dense path agrees with the loops too
        assert list(d_ids) == [r[0] for r in rows]
        np.testing.assert_allclose(d_sc, mix, rtol=1e-4, atol=1e-4)
    res = lib.search("high", scorer="hybrid", k=2)
    assert len(res) == 2 and res[0].score >= res[1].score
    # the novelty gate: trained only on "low" captions, the model leaves a "high" query to the bridge
    low = np.zeros((1, 16), np.float32)
    low[0, int(FREQS["low"] // 250)] = 1.0
    lib.model.caption_reference = low
    lib.model.extras = {EXTRA_HYBRID_WEIGHT: 1.0, EXTRA_HYBRID_GATE: 0.9}
    inside = [c for c in range(n) if int(ids[c]) in cand]
    want = sorted(inside, key=lambda c: (-zb[c], c))[:7]
    got, sc = HybridScorer().top(lib, "high", 7)
    assert list(got) == [rows[c][0] for c in want]
    np.testing.assert_allclose(sc, [zb[c] for c in want], rtol=1e-4, atol=1e-4)
    lib.close()


def test_search_state_over_hnsw_with_gaps_and_untagged_segments():
    """SearchState.hybrid_top over a real HNSW index (the graph search with efSearch 512 is exact at this
    size) against loops over every tagged segment: ids with gaps, segments without tags in the same graph
    (added first, so FAISS rows are not positions), candidate lists shorter than the library."""
    from atae.library.search import SearchState
    from atae.library.vectors import VectorIndex

    rng = np.random.default_rng(8)
    n = 900
    centres = rng.standard_normal((6, 16))
    sound = rng.integers(0, 6, n)
    v = (centres[sound] + 0.5 * rng.standard_normal((n, 16))).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    topics = rng.random((6, br.N_LABELS)) ** 8
    t = np.clip(topics[sound] + 0.05 * rng.random((n, br.N_LABELS)), 0, 1).astype(np.float32)
    ids = np.arange(5, 5 + 2 * n, 2, dtype=np.int64)
    vi = VectorIndex.empty(16, "hnsw")
    untagged = (centres[rng.integers(0, 6, 60)] + 0.5 * rng.standard_normal((60, 16))).astype(np.float32)
    vi.add(np.arange(6, 6 + 2 * 60, 2, dtype=np.int64), untagged)
    vi.add(ids, v)
    st = SearchState(ids, t, vi, vi.rows_of(ids))
    for s in range(4):
        q = centres[s] / np.linalg.norm(centres[s])
        cos = rng.uniform(0, 0.45, br.N_LABELS)
        cos[np.argsort(-topics[(s + 1) % 6])[:3]] = [0.9, 0.8, 0.7]  # the bridge asks for another sound
        d = br.softmax_rows(cos[None], br.DEFAULT_TEMPERATURE)[0]
        a = [sum(float(x) * float(y) for x, y in zip(r, q, strict=True)) for r in v]
        b = [sum(float(x) * float(y) ** 0.5 for x, y in zip(d, r, strict=True)) for r in t]
        for cands in (100, n):
            inside = set(_top_ids(a, ids, cands)) | set(_top_ids(b, ids, cands))
            for w in (0.0, 0.3, 0.5):  # 0: the gate's bridge-only queries
                mix = w * np.asarray(_z(a)) + (1 - w) * np.asarray(_z(b))
                for k in (5, 40):
                    keep = [c for c in range(n) if int(ids[c]) in inside]
                    want = sorted(keep, key=lambda c: (-mix[c], c))[:k]
                    pos, sc = st.hybrid_top(q, d, w, k, graph=cands, bridge=cands)
                    assert [int(ids[p]) for p in pos] == [int(ids[c]) for c in want]
                    np.testing.assert_allclose(sc, mix[want], rtol=1e-4, atol=1e-4)
        bpos, bsc = st.bridge_top(d, 10)
        assert [int(ids[p]) for p in bpos] == _top_ids(b, ids, 10)


def test_bridge_candidates_of_a_large_library(monkeypatch):
    """Above DENSE_LIMIT the bridge ranks segments by the BRIDGE_LABELS labels a query weighs most and
    rescores the best BRIDGE_CANDIDATES. A distribution on at most BRIDGE_LABELS labels is thereby exact:
    the result must equal scoring every segment; for any other, every result carries its exact score."""
    from atae.library import search

    monkeypatch.setattr(search, "DENSE_LIMIT", 500)
    monkeypatch.setattr(search, "BRIDGE_CANDIDATES", 50)
    rng = np.random.default_rng(4)
    n = 3000
    tags = (rng.random((n, br.N_LABELS)) ** 6).astype(np.float32)
    feats = np.sqrt(tags.astype(np.float64))
    ids = np.arange(1, n + 1)
    st = search.SearchState(ids, tags)
    for _ in range(5):
        d = np.zeros(br.N_LABELS)
        on = rng.choice(br.N_LABELS, search.BRIDGE_LABELS, replace=False)
        d[on] = rng.dirichlet(np.ones(len(on)))
        exact = feats @ d
        pos, sc = st.bridge_top(d, 20)
        assert [int(ids[p]) for p in pos] == _top_ids(exact, ids, 20)
        np.testing.assert_allclose(sc, exact[pos], rtol=1e-5)
    d = br.softmax_rows(rng.uniform(0, 0.8, (1, br.N_LABELS)), 0.07)[0]
    pos, sc = st.bridge_top(d, 20)
    np.testing.assert_allclose(sc, feats[pos] @ d, rtol=1e-5)
    assert list(sc) == sorted(sc, reverse=True)


def test_segments_without_tags_are_left_out_and_reported(tmp_path, sounds):
    """A library with some untagged segments (an older index): bridge and hybrid rank the tagged ones,
    say how many were left out, and the adapter still ranks every file."""
    lib = _lib(tmp_path / "lib", sounds, BandTower(), model=IdentityModel())
    high = lib.db.conn.execute("SELECT s.id FROM segments s JOIN files f ON f.id = s.file_id "
                               "WHERE f.path LIKE '%high.wav'").fetchone()[0]
    with lib.db.transaction():
        lib.db.conn.execute("UPDATE segments SET tags = NULL WHERE id = ?", (high,))
    assert lib.scorers()["untagged"] == 1 and "bridge" in lib.scorers()["available"]
    assert [r.path.endswith("high.wav") for r in lib.search("high", scorer="bridge", k=5)] == [False, False]
    assert len(lib.search("high", scorer="adapter", k=5)) == 3
    lib.close()
    _lib(tmp_path / "bare", sounds, BandTower()).close()  # no model: the CLI can open it
    bare = Library.open(tmp_path / "bare")
    with bare.db.transaction():
        bare.db.conn.execute("UPDATE segments SET tags = NULL WHERE id = ?", (high,))
    bare.close()
    code, out = _cli("search", "--db", tmp_path / "bare", "high", "--scorer", "bridge")
    assert code == 0 and "1 segments have no AudioSet tags" in out and "high.wav" not in out
