"""vectors.py speed knobs: HNSW parameter overrides, and indexes saved with older defaults still open."""

from __future__ import annotations

import faiss
import numpy as np

from atae.library import vectors as V


def _hnsw(vi: V.VectorIndex) -> faiss.IndexHNSW:
    return faiss.downcast_index(vi.index.index)


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.arange(10, 10 + n, dtype=np.int64)


def test_new_index_overrides_and_defaults():
    outer = V.new_index(8, "hnsw", m=12, ef_construction=24)  # keep it: it owns the HNSW index
    h = faiss.downcast_index(outer.index)
    # faiss gives levels >= 1 M neighbour slots and level 0 twice that
    assert (h.hnsw.nb_neighbors(1), h.hnsw.nb_neighbors(0), h.hnsw.efConstruction) == (12, 24, 24)
    outer2 = V.new_index(8, "hnsw")
    d = faiss.downcast_index(outer2.index)
    assert (d.hnsw.nb_neighbors(1), d.hnsw.efConstruction, d.hnsw.efSearch) == (
        V.HNSW_M, V.HNSW_EF_CONSTRUCTION, V.HNSW_EF_SEARCH)


def test_index_saved_with_other_parameters_opens_and_searches(tmp_path):
    """A library built before the defaults changed (M=32, efC=80, efSearch=64 saved) keeps its graph and
    gets today's efSearch; its answers equal brute force on a set this small."""
    x, ids = _data()
    old = V.VectorIndex(V.new_index(16, "hnsw", m=32, ef_construction=80))
    _hnsw(old).hnsw.efSearch = 64
    old.add(ids, x)
    old.save(tmp_path / "vectors.faiss")
    vi = V.VectorIndex.load(tmp_path / "vectors.faiss")
    assert vi is not None and vi.kind == "hnsw" and vi.ntotal == len(x)
    assert (_hnsw(vi).hnsw.nb_neighbors(1), _hnsw(vi).hnsw.efSearch) == (32, V.HNSW_EF_SEARCH)
    for qi in (0, 7, 123):
        q = x[qi] + 0.1 * np.random.default_rng(qi).standard_normal(16).astype(np.float32)
        scores, got = vi.search(q, 5)
        qn = q / np.linalg.norm(q)
        ref = ids[np.argsort(-(x @ qn), kind="stable")[:5]]
        assert list(got) == list(ref)
        np.testing.assert_allclose(scores, np.sort(x @ qn)[::-1][:5], atol=1e-5)


def test_flat_index_from_before_opens(tmp_path):
    x, ids = _data(50, 8, seed=1)
    vi = V.VectorIndex.empty(8, "flat")
    vi.add(ids, x)
    vi.save(tmp_path / "v.faiss")
    back = V.VectorIndex.load(tmp_path / "v.faiss")
    assert back.kind == "flat" and list(back.ids()) == list(ids)
