"""Text scorers for a library: the trained adapter, the zero-shot AudioSet tag bridge, and their hybrid.

Names (the same on the CLI, in the web page and in ``Library.search(..., scorer=...)``):

* ``adapter`` (alias ``model``): the library's own vector space, i.e. the trained model's cosine.
* ``bridge``: ``atae.bridge.TagBridge`` over the AudioSet tags stored per segment at index time (no
  training needed, no audio re-read). Temperature from the model's extras if a model is set, else the
  bridge default.
* ``hybrid``: z-scored mix of the model's cosine and the bridge score, weight from the model's extras
  (``atae.bridge.hybrid_weight``), else the documented default.

A scorer object has ``top(library, text, n) -> (segment_ids, scores)`` (the n best segments, best
first) and ``score(library, text)`` (every segment, dense; kept for custom scorers and for tests).
Bridge search goes through ``atae.bridge.TagSearchIndex`` (``TagBridge.search``): exact top-k from
each label's sorted best clips, reading only the labels a query needs. Hybrid search gets each query's
z-score statistics over all segments in closed form from cached moments (adapter vectors' mean and
covariance, tags' mean and covariance), which makes the hybrid a linear score. Over an exact index every
segment's cosine comes from FAISS's kernel on its own storage (the adapter search's cost) and
``bridge.hybrid_top_k_dense`` adds the bridge from the label lists; over HNSW ``bridge.hybrid_top_k``
rescores the graph's top-N plus every segment the bridge could lift past the k-th score, with the bridge
side (moments, the label lists' best segments scored on both sides) computed on a second core while the
graph is searched. Both prove the top-k by a bound and keep no second copy of the vectors. Per-library
state (tag index, moments, FAISS rows, id positions) is rebuilt when the library's generation, model or
vector index changes.
"""

from __future__ import annotations

import numpy as np

from atae import bridge
from atae.errors import AtaeError, QueryError

SCORER_NAMES = ("adapter", "bridge", "hybrid")
ALIASES = {"model": "adapter"}
BRIDGE_TEXT_TOWER = ("minilm", {"layer": -1})


def canonical(name: str) -> str:
    """The canonical scorer name ("model" -> "adapter"); QueryError for an unknown name."""
    n = ALIASES.get(name, name) if isinstance(name, str) else None
    if n not in SCORER_NAMES:
        raise QueryError(f"unknown scorer {name!r}", fix="use --scorer adapter, bridge or hybrid")
    return n


def _has_tags(library) -> bool:
    row = library.db.conn.execute("SELECT 1 FROM segments WHERE tags IS NOT NULL LIMIT 1").fetchone()
    return row is not None


def _model(library):
    return library.model if library.model_version else None


def unavailable(library) -> dict[str, str]:
    """{scorer name: why it cannot be used} for this library (absent names are available)."""
    why: dict[str, str] = {}
    empty = library.db.conn.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is None
    no_model = "needs a trained model: index with `atae index DIR --db LIB --model RUN`"
    if not library.model_version:
        why["adapter"] = why["hybrid"] = no_model
    if not empty and not _has_tags(library):
        head = (f"this library's audio tower ({library.stored_tower_info.name}) has no AudioSet head: "
                "index into a new --db with --audio-encoder efficientat-mn04 (or cnn14)")
        why["bridge"] = head
        why.setdefault("hybrid", head)
    return why


def available(library) -> list[str]:
    """The scorer names this library can use, in ``SCORER_NAMES`` order."""
    bad = unavailable(library)
    return [n for n in SCORER_NAMES if n not in bad]


def preferred(names) -> str | None:
    """The default among available scorer names: ``adapter``, else ``bridge``, else None (shared by
    ``default_scorer`` and ``Library.scorers`` so the CLI and the web page agree)."""
    return next((n for n in ("adapter", "bridge") if n in names), None)


def default_scorer(library) -> str:
    """``adapter`` with a trained model, else ``bridge`` if the tower has an AudioSet head, else an error."""
    name = preferred(available(library))
    if name is not None:
        return name
    raise QueryError(
        f"this library has no trained model and its audio tower ({library.stored_tower_info.name}) has no "
        "AudioSet head, so text search is not possible (query by example still works)",
        path=library.root,
        fix="train a model (atae train ...) and index with `atae index DIR --db LIB --model RUN`, or index "
        "into a new --db with --audio-encoder efficientat-mn04",
    )


def _require(library, name: str) -> None:
    why = unavailable(library).get(name)
    if why is not None:
        raise QueryError(f"the {name!r} scorer is not available for this library: {why}", path=library.root,
                         fix="use --scorer " + " or ".join(available(library) or ["(none)"]))


def _bridge_text_tower(library, text_tower):
    if text_tower is not None:
        return text_tower
    if library._text_tower is not None:  # set explicitly (tests, a caller's own tower)
        return library._text_tower
    if _model(library) is not None:
        return library.text_tower  # the model's tower; TagBridge reads its last layer
    from atae.towers.registry import get_text_tower

    name, opts = BRIDGE_TEXT_TOWER
    return get_text_tower(name, **opts)


class BridgeScorer:
    """Zero-shot: rank segments by the AudioSet classes the query asks for (no training needed)."""

    name = "bridge"

    def __init__(self, text_tower=None):
        self.text_tower = text_tower
        self._key = None
        self._state: dict = {}

    def _fresh(self, library) -> dict:
        index = getattr(library, "index", None)
        key = (library.db.generation(), library.model_version, id(index), getattr(index, "ntotal", None))
        if key != self._key:
            self._state, self._key = {}, key
        return self._state

    def bridge(self, library):
        """The library's TagBridge (temperature from the model's extras, else the default)."""
        st = self._fresh(library)
        if "tb" not in st:
            _require(library, "bridge")
            temp = bridge.bridge_temperature(_model(library))
            st["tb"] = bridge.TagBridge(_bridge_text_tower(library, self.text_tower), temperature=temp)
        return st["tb"]

    def _index(self, library):
        """(segment ids with tags, their TagSearchIndex); the tag matrix itself is not kept beside it."""
        st = self._fresh(library)
        if "index" not in st:
            ids, tags = library.db.tags_matrix()
            st["index"] = (ids, bridge.TagSearchIndex(tags) if tags is not None and len(ids) else None)
        return st["index"]

    def score(self, library, text: str):
        """Every tagged segment's bridge score (dense)."""
        tb = self.bridge(library)
        ids, index = self._index(library)
        if index is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return ids, index.exact(tb.query_distribution([text])[0]).astype(np.float32)

    def top(self, library, text: str, n: int):
        """The n best segments (ids, scores), best first; the same as sorting ``score`` (exact)."""
        tb = self.bridge(library)
        ids, index = self._index(library)
        if index is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        pos, sc = tb.search(text, index, n)
        return ids[pos], sc


class IdPositions:
    """Positions of FAISS hits (segment ids) in the sorted ids of the hybrid's segments, -1 for others
    (segments without tags, HNSW tombstones). A table when the ids are dense (one read a hit; a binary
    search over 100k ids misses the cache ~17 times a hit, ~40 us a query), else a binary search."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, np.int64)
        self.table = None
        if len(self.ids) and self.ids[0] >= 0 and self.ids[-1] < 4 * len(self.ids) + 1024:
            self.table = np.full(int(self.ids[-1]) + 1, -1, np.int64)
            self.table[self.ids] = np.arange(len(self.ids))

    def __call__(self, hit: np.ndarray) -> np.ndarray:
        hit = np.asarray(hit, np.int64)
        if not len(self.ids):
            return np.full(len(hit), -1, np.int64)
        if self.table is not None:
            inside = (hit >= 0) & (hit < len(self.table))
            return np.where(inside, self.table[np.where(inside, hit, 0)], -1)
        pos = np.minimum(np.searchsorted(self.ids, hit), len(self.ids) - 1)
        return np.where(self.ids[pos] == hit, pos, -1)


# bridge clips prefetched while an HNSW search runs: ~0.5 us each (two scattered rows), well inside the
# ~1 ms graph search; enough to cover the bridge threshold of sharp (default-temperature) queries
PREFETCH_CLIPS = 512


def fast_hybrid_top(vector_index, ids, tag_index, moments, q, dist, weight: float, n: int, *,
                    stats: dict | None = None, rows: np.ndarray | None | bool = False,
                    positions: IdPositions | None = None, overlap: bool | None = None, **lists):
    """The n best (segment ids, hybrid scores) of ``bridge.hybrid_top_k`` over a library's FAISS index.

    ``ids``: sorted segment ids of the hybrid's segments (tags and a vector), rows of ``tag_index``
    (``bridge.TagSearchIndex``) in that order; ``moments``: ``bridge.RowMoments`` of their vectors;
    ``q``: the unit query vector; ``dist``: the query's label distribution. FAISS hits outside ``ids``
    (segments without tags, HNSW tombstones) are skipped but still bound the clips left out.

    List length: a flat index scans every vector whatever k, so a long adapter list (20 k) is nearly
    free and keeps the bridge threshold high; an HNSW search costs in proportion to its list (efSearch
    >= k), so there the list starts at the adapter's own efSearch (the bound widens it if needed).
    ``lists``: ``factor`` / ``min_n`` of ``bridge.hybrid_top_k`` to override that choice (benchmarks).

    An exact index: its stored vectors are scored directly (one matrix-vector product, the cost of the
    adapter search itself) and ``bridge.hybrid_top_k_dense`` adds the bridge from the label lists. ``rows``:
    ``VectorIndex.storage_rows(ids)`` when the caller caches it (False: computed here); ``positions``:
    ``IdPositions(ids)``, likewise.

    HNSW with ``overlap`` (default: when there is a second core, ``vectors.BACKGROUND_SEARCH``): while this
    thread runs the graph search (most of an HNSW query's time), a background thread computes the z-score
    moments and prefetches the bridge side (``TagSearchIndex.prefetch``: the kept labels' best clips, both
    scores exact), which seeds ``bridge.hybrid_top_k``. The result is still exact relative to the graph's
    top-N, and closer to the dense ranking than without the seed (a clip the graph misses but the bridge
    lists hold is found)."""
    from atae.library.vectors import BACKGROUND_SEARCH, HNSW_EF_SEARCH, run_beside

    if rows is False:
        rows = vector_index.storage_rows(ids)
    if positions is None:
        positions = IdPositions(ids)

    def at_rows(p):
        return p if rows is None else rows[p]

    def coefficients():
        return bridge.hybrid_coefficients(moments.moments(q), tag_index.moments(dist), weight)

    def bridge_side():
        pre = tag_index.prefetch(dist, PREFETCH_CLIPS)
        coef = coefficients()
        return coef, bridge.hybrid_seed(coef, n, len(ids), pre.pos,
                                        vector_index.scores_at(q, at_rows(pre.pos)), pre.scores, pre.bound)

    hnsw = vector_index.kind == "hnsw"
    opts = lists or ({"factor": 1, "min_n": HNSW_EF_SEARCH} if hnsw else {})
    first_n = bridge.first_list_length(min(n, len(ids)), **opts)
    graph = seed = None
    if hnsw and (BACKGROUND_SEARCH if overlap is None else overlap) and first_n < len(ids):
        side = run_beside(bridge_side, background=True)
        graph = vector_index.search(q, first_n)
        coef, seed = side.result()
    else:
        coef = coefficients()
        a = vector_index.all_scores(q) if not lists else None
        if a is not None:
            pos, sc = bridge.hybrid_top_k_dense(n, a if rows is None else a[rows], coef, tag_index, dist,
                                                stats=stats)
            return ids[pos], sc

    def adapter_top(k):
        nonlocal graph
        sc, hit = graph if graph is not None and k == first_n else vector_index.search(q, k)
        graph = None
        pos = positions(hit)
        ok = pos >= 0
        return pos[ok], sc[ok], (float(sc[-1]) if len(sc) else np.inf)

    pos, sc = bridge.hybrid_top_k(
        n, len(ids), coef, adapter_top=adapter_top,
        adapter_at=lambda p: vector_index.scores_at(q, at_rows(p)),
        bridge_top=lambda k: tag_index.top_k(dist, k), bridge_at=lambda p: tag_index.exact(dist, p),
        bridge_above=lambda t, limit: tag_index.above(dist, t, limit), stats=stats, seed=seed, **opts)
    if stats is not None:
        stats["overlap"] = seed is not None
        stats["prefetched"] = 0 if seed is None else int(len(seed.pos))
    return ids[pos], sc


class HybridScorer(BridgeScorer):
    """Model cosine and bridge score, each z-scored over the library's segments, mixed by the weight the
    model stores (``atae.bridge.hybrid_weight``)."""

    name = "hybrid"

    def __init__(self, text_tower=None):
        super().__init__(text_tower)
        self.last_stats: dict = {}  # diagnostics of the last ``top``: rounds, candidates rescored, ...

    def _check(self, library):
        """The model, once the hybrid is known usable; cached per generation because ``_require`` counts
        the library's rows (a full scan per query otherwise)."""
        st = self._fresh(library)
        if "model" not in st:
            _require(library, "hybrid")
            m = _model(library)
            try:
                bridge.check_hybrid_tower(m, library.stored_tower_info)
            except AtaeError as exc:
                raise QueryError(str(exc).split(" (fix: ")[0], path=library.root, fix=exc.fix) from exc
            st["model"] = m
        return st["model"]

    def _aligned(self, library):
        """Per-generation state of the segments that have both tags and a vector: their ids (sorted), the
        tag index (with the exact bridge moments), and the adapter vectors' mean and covariance. The
        vectors themselves stay in the FAISS index (read in chunks here, by id at query time)."""
        st = self._fresh(library)
        if "aligned" not in st:
            ids, tags = library.db.tags_matrix()
            vi = library.index
            if tags is None or vi is None or vi.ntotal == 0:
                st["aligned"] = None
                return None
            import faiss

            all_ids = np.asarray(faiss.vector_to_array(vi.index.id_map), dtype=np.int64)
            keep = np.isin(ids, all_ids)
            ids, tags = ids[keep], tags[keep]
            if not len(ids):
                st["aligned"] = None
                return None
            moments = bridge.RowMoments(vi.dim)
            chunk = 16384
            for a in range(0, vi.ntotal, chunk):
                m = min(chunk, vi.ntotal - a)
                rows = vi.index.index.reconstruct_n(a, m)
                moments.add(rows[np.isin(all_ids[a:a + m], ids)])
            st["aligned"] = (ids, bridge.TagSearchIndex(tags), moments, vi.storage_rows(ids),
                             IdPositions(ids))
        return st["aligned"]

    @staticmethod
    def _unit(library, text):
        q = np.asarray(library.query_vector(text=text), dtype=np.float32).reshape(-1)
        return q / np.float32(max(float(np.linalg.norm(q)), 1e-12))

    def score(self, library, text: str):
        """Every aligned segment's hybrid score (dense: ``bridge.hybrid_scores`` over all of them)."""

        m = self._check(library)
        tb = self.bridge(library)
        al = self._aligned(library)
        if al is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids, index, _, rows, _ = al
        q = self._unit(library, text)
        a = library.index.scores_at(q, np.arange(len(ids)) if rows is None else rows).astype(np.float64)
        b = index.exact(tb.query_distribution([text])[0])
        return ids, bridge.hybrid_scores(a[None], b[None], bridge.hybrid_weight(m))[0]

    def top(self, library, text: str, n: int):
        """The n best segments by the hybrid, exactly as ``score`` ranks them (``bridge.hybrid_top_k``):
        closed-form per-query z-scores from the cached moments, candidates from the FAISS adapter search
        and the tag index, rescored exactly. Exact for a flat index; with HNSW exact relative to it."""

        m = self._check(library)
        tb = self.bridge(library)
        al = self._aligned(library)
        if al is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids, index, moments, rows, positions = al
        dist = tb.query_distribution([text])[0]  # first: its text pass also fills the adapter's cache
        q = self._unit(library, text)
        return fast_hybrid_top(library.index, ids, index, moments, q, dist, bridge.hybrid_weight(m), n,
                               stats=self.last_stats, rows=rows, positions=positions)


SCORERS = {"bridge": BridgeScorer, "hybrid": HybridScorer}
