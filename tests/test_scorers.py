"""Scorer choice and bad input (issue 5) through the library, `atae search` and the HTTP API: a tower
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
from atae.towers import registry
from atae.towers.base import TowerInfo
from library_fakes import FREQS, BandTower, IdentityModel, WordTower, write_tone, write_tone_mix

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from atae.server.app import create_app  # noqa: E402


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
        m.extras[br.EXTRA_HYBRID_WEIGHT] = weight
    m.save(path)
    return path


def test_tower_without_head_refuses_bridge_and_hybrid_everywhere(tmp_path, sounds):
    lib = _lib(tmp_path / "lib", sounds, NoHead(), NoHeadModel())
    assert lib.scorers()["available"] == ["adapter"]
    for name in ("bridge", "hybrid"):
        with pytest.raises(QueryError, match="no AudioSet head"):
            lib.search("high", scorer=name)
    assert lib.search("high", k=1)[0].path.endswith("high.wav")  # the adapter still works
    with TestClient(create_app(lib), raise_server_exceptions=False) as c:
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
    # 527 labels is uniform and each file scores the mean of its stored tags
    lib = Library.open(tmp_path / "lib")
    exp = {}
    for sid, blob in lib.db.conn.execute("SELECT id, tags FROM segments").fetchall():
        path = lib.db.segment_rows([sid])[sid][1]
        exp[path] = float(np.frombuffer(blob, np.float16).astype(np.float64).mean())
    lib.close()
    assert [r["path"] for r in rows] == sorted(exp, key=exp.get, reverse=True)
    np.testing.assert_allclose([r["score"] for r in rows], sorted(exp.values(), reverse=True), rtol=1e-4)
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
    with TestClient(create_app(lib), raise_server_exceptions=False) as c:
        r = c.get("/api/search", params={"q": "high", "scorer": "hybrid"})
        assert r.status_code == 400 and "trained on audio tower 'other'" in r.json()["error"]
    lib.close()


@pytest.mark.parametrize("query", ["?!", "... --- ...", "¿¡ — …"])
def test_query_without_words_is_refused(tmp_path, sounds, query):
    lib = _lib(tmp_path / "lib", sounds, BandTower(), IdentityModel())
    for name in ("adapter", "bridge", "hybrid"):
        with pytest.raises(QueryError, match="no words"):
            lib.search(query, scorer=name)
    with TestClient(create_app(lib), raise_server_exceptions=False) as c:
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


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_fast_hybrid_through_the_library_equals_brute_force(tmp_path, kind):
    """HybridScorer.top against every segment scored with loops here: WordTower gives zero label
    embeddings, so the query's label distribution is uniform and b = the mean of a segment's stored tags;
    the query "high" is the one-hot of the HIGH band, so a = the segment vector's entry in that band."""
    import faiss

    from atae.library.scorers import HybridScorer

    for i in range(4):
        write_tone_mix(tmp_path / "sounds" / f"m{i}.wav", 30.0, seed=i)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel(), long_s=2.0, window_s=0.5, hop_s=0.25, index=kind)
    lib.add([tmp_path / "sounds"])
    assert lib.index.kind == kind  # HNSW at this size with efSearch >= 256 visits every vector: exact
    rows = lib.db.conn.execute("SELECT id, tags FROM segments ORDER BY id").fetchall()
    vi = lib.index
    vec_of = dict(zip(faiss.vector_to_array(vi.index.id_map).tolist(),
                      vi.index.index.reconstruct_n(0, vi.ntotal), strict=True))
    band = int(FREQS["high"] // 250)
    a = [float(vec_of[sid][band]) for sid, _ in rows]
    b = [sum(float(x) for x in np.frombuffer(blob, np.float16)) / 527 for _, blob in rows]
    n = len(rows)
    assert n > 400  # more than the first candidate lists (256), so the bound has to do the work

    def z(row):
        mu = sum(row) / n
        sd = (sum((x - mu) ** 2 for x in row) / n) ** 0.5
        return [(x - mu) / sd for x in row]

    za, zb = z(a), z(b)
    for w in (0.0, 0.3, 1.0):
        lib.model.extras = {br.EXTRA_HYBRID_WEIGHT: w}
        hs = HybridScorer()
        mix = [w * x + (1 - w) * y for x, y in zip(za, zb, strict=True)]
        want = sorted(range(n), key=lambda c: (-mix[c], c))[:7]
        ids, sc = hs.top(lib, "high", 7)
        assert list(ids) == [rows[c][0] for c in want]
        np.testing.assert_allclose(sc, [mix[c] for c in want], rtol=1e-4, atol=1e-4)
        assert not hs.last_stats["dense"] and hs.last_stats["candidates"] < n  # the fast path ran
        # no second copy of the vectors: the scorer's state holds nothing with a row per segment x dim
        (_, index, moments, _, _), = [v for v in hs._state.values() if isinstance(v, tuple) and len(v) == 5]
        assert moments.cov.shape == (16, 16) and index.by_label.shape == (527, n)
        d_ids, d_sc = hs.score(lib, "high")  # the dense path agrees with the loops too
        assert list(d_ids) == [r[0] for r in rows]
        np.testing.assert_allclose(d_sc, mix, rtol=1e-4, atol=1e-4)
    res = lib.search("high", scorer="hybrid", k=2)
    assert len(res) == 2 and res[0].score >= res[1].score
    lib.close()


def test_id_positions_table_and_search_agree_with_a_dict():
    from atae.library.scorers import IdPositions

    rng = np.random.default_rng(3)
    dense_ids = np.sort(rng.choice(np.arange(1, 3000), 1200, replace=False))  # gaps: removed segments
    sparse_ids = np.sort(rng.choice(10**9, 500, replace=False))  # too sparse for a table
    for ids in (dense_ids, sparse_ids, np.zeros(0, np.int64)):
        look = IdPositions(ids)
        where = {int(x): i for i, x in enumerate(ids)}
        probe = np.r_[ids[::7], -1, 0, 2999, 3000, 10**9 + 5, rng.integers(0, 4000, 50)].astype(np.int64)
        assert list(look(probe)) == [where.get(int(x), -1) for x in probe]
    assert IdPositions(dense_ids).table is not None and IdPositions(sparse_ids).table is None


@pytest.mark.parametrize("overlap", [True, False])
def test_fast_hybrid_over_hnsw_equals_brute_force_with_and_without_the_second_core(overlap):
    """fast_hybrid_top over a real HNSW index (960 vectors: the graph search with efSearch 256 is exact
    here) against loops over every tagged clip, with the bridge side beside the search or after it."""
    from atae.library.scorers import IdPositions, fast_hybrid_top
    from atae.library.vectors import VectorIndex

    rng = np.random.default_rng(8)
    n = 900
    centres = rng.standard_normal((6, 16))
    sound = rng.integers(0, 6, n)
    v = (centres[sound] + 0.5 * rng.standard_normal((n, 16))).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    topics = rng.random((6, br.N_LABELS)) ** 8
    t = np.clip(topics[sound] + 0.05 * rng.random((n, br.N_LABELS)), 0, 1).astype(np.float32)
    ids = np.arange(5, 5 + 2 * n, 2, dtype=np.int64)  # segment ids with gaps
    vi = VectorIndex.empty(16, "hnsw")
    # segments without tags sit in the same graph (ids in the gaps, added first, so the FAISS rows of the
    # tagged ones are not their positions): the hybrid skips them
    untagged = (centres[rng.integers(0, 6, 60)] + 0.5 * rng.standard_normal((60, 16))).astype(np.float32)
    vi.add(np.arange(6, 6 + 2 * 60, 2, dtype=np.int64), untagged)
    vi.add(ids, v)
    rows = vi.storage_rows(ids)
    assert rows is not None and rows[0] == 60
    index = br.TagSearchIndex(t)
    moments = br.RowMoments.of(v)
    for s in range(4):
        q = centres[s] / np.linalg.norm(centres[s])
        cos = rng.uniform(0, 0.45, br.N_LABELS)
        cos[np.argsort(-topics[(s + 1) % 6])[:3]] = [0.9, 0.8, 0.7]  # the bridge asks for another sound
        d = br.softmax_rows(cos[None], br.DEFAULT_TEMPERATURE)[0]
        a = [sum(float(x) * float(y) for x, y in zip(r, q, strict=True)) for r in v]
        b = [sum(float(x) * float(y) for x, y in zip(r, d, strict=True)) for r in t]
        for w in (0.3, 0.5):
            za, zb = (np.asarray(a) - np.mean(a)) / np.std(a), (np.asarray(b) - np.mean(b)) / np.std(b)
            mix = w * za + (1 - w) * zb
            for k in (5, 40):
                want = sorted(range(n), key=lambda c: (-mix[c], c))[:k]
                stats = {}
                got, sc = fast_hybrid_top(vi, ids, index, moments, q, d, w, k, stats=stats, rows=rows,
                                          positions=IdPositions(ids), overlap=overlap)
                assert list(got) == [int(ids[c]) for c in want]
                np.testing.assert_allclose(sc, mix[want], rtol=1e-4, atol=1e-4)
                assert stats["overlap"] is overlap and not stats["dense"]
