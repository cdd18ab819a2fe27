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
    """A library built before the defaults changed (M=24, efC=48, efSearch=64 saved) keeps its graph and
    gets today's efSearch; its answers equal brute force on a set this small."""
    x, ids = _data()
    old = V.VectorIndex(V.new_index(16, "hnsw", m=24, ef_construction=48))
    _hnsw(old).hnsw.efSearch = 64
    old.add(ids, x)
    old.save(tmp_path / "vectors.faiss")
    vi = V.VectorIndex.load(tmp_path / "vectors.faiss")
    assert vi is not None and vi.kind == "hnsw" and vi.ntotal == len(x)
    assert (_hnsw(vi).hnsw.nb_neighbors(1), _hnsw(vi).hnsw.efSearch) == (24, V.HNSW_EF_SEARCH)
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


def test_in_place_scores_and_vectors_match_the_stored_vectors():
    """scores_at / vectors read FAISS's storage at rows found by rows_of: compare with plain dot products
    of the input vectors (normalised here) -- also after removals (flat) and for an HNSW index, whose
    vectors live in its own flat storage."""
    import pytest

    from atae.errors import LibraryError

    x, ids = _data(n=200, d=16, seed=3)
    q = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    qn = q / np.linalg.norm(q)
    for kind in ("flat", "hnsw"):
        vi = V.VectorIndex.empty(16, kind)
        shuffled = np.random.default_rng(5).permutation(len(ids))
        vi.add(ids[shuffled], x[shuffled])  # rows not in id order
        want = {int(i): float(v @ qn) for i, v in zip(ids, x.astype(np.float64), strict=True)}
        if kind == "flat":
            gone = ids[[0, 3, 50]]
            assert vi.remove(gone)
            kept = np.setdiff1d(ids, gone)
        else:
            kept = ids
        rows = vi.rows_of(kept)
        np.testing.assert_allclose(vi.scores_at(q, rows), [want[int(i)] for i in kept], rtol=1e-5, atol=1e-6)
        by_id = {int(i): r for i, r in zip(ids, x, strict=True)}
        np.testing.assert_allclose(vi.vectors(rows), [by_id[int(i)] for i in kept], atol=1e-6)
        with pytest.raises(LibraryError):
            vi.scores_at(q, np.array([vi.ntotal]))


def test_kind_and_storage_are_fixed_at_open(tmp_path):
    x, ids = _data()
    for kind in ("flat", "hnsw"):
        vi = V.VectorIndex.empty(16, kind)
        vi.add(ids, x)
        assert vi.kind == kind
        path = tmp_path / f"{kind}.faiss"
        vi.save(path)
        back = V.VectorIndex.load(path)
        assert back.kind == kind
        q = x[7]
        np.testing.assert_allclose(back.scores_at(q, np.array([7, 0])), [x[7] @ q, x[0] @ q], rtol=1e-6)
