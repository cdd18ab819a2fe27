"""What a library's text scorers search with, built once per library generation and shared by all of them.

``SearchState`` holds, for the segments that have AudioSet tags:

* their ids (sorted) and FAISS rows, so a candidate's adapter cosine is read from the index in place;
* their bridge tag features ``sqrt(tags)`` (``atae.bridge.tag_features``), float32, one row a segment;
* a rank-``RANK`` projection of those features (their principal components), scanned to find the
  bridge's candidates in a library too large to score every segment for every query;
* each side's corpus mean and covariance, so the hybrid's per-query z-scores over all segments are closed
  form (mean = v . mu, variance = v' C v) although only candidates are scored.

Search rules (the same results as ``atae.scoring`` on the whole library, up to the candidate lists):

* **bridge**: every segment scored exactly when there are at most ``DENSE_LIMIT``; above, the
  ``BRIDGE_CANDIDATES`` best by the projection are rescored exactly.
* **hybrid**: the union of the adapter's top ``HYBRID_CANDIDATES`` (the FAISS index: exact for a flat
  index, approximate for HNSW) and the bridge's top ``HYBRID_CANDIDATES``, rescored exactly on both sides
  and mixed with the corpus z-scores. A segment outside both lists would have to rank low on both sides
  yet high on their mix; ``bench/bench_hybrid.py`` measures how often that costs a result (recall against
  the dense computation) and chose the list lengths.
"""

from __future__ import annotations

import numpy as np

from atae import bridge as br
from atae import scoring

DENSE_LIMIT = 20_000
RANK = 64
BRIDGE_CANDIDATES = 1024
HYBRID_CANDIDATES = 256


class SearchState:
    """The search structures of one library generation (see the module docstring)."""

    def __init__(self, ids: np.ndarray, tags: np.ndarray, vectors=None, rows: np.ndarray | None = None):
        """``ids``: sorted segment ids with tags; ``tags``: their (n, 527) probabilities; ``vectors``: the
        library's ``VectorIndex`` (None: no adapter side); ``rows``: each id's row in it."""
        self.ids = np.asarray(ids, np.int64)
        self.feats = br.tag_features(tags)
        self.index, self.rows = vectors, rows
        self.bridge_mean, cov = _moments(self.feats)
        self.bridge_cov = cov
        self.basis = self.low = None
        if len(self.ids) > DENSE_LIMIT:
            _, vec = np.linalg.eigh(cov)
            self.basis = np.ascontiguousarray(vec[:, ::-1][:, :RANK], dtype=np.float32)
            self.low = np.ascontiguousarray(self.feats @ self.basis)
        self.adapter_mean = self.adapter_cov = None
        if vectors is not None and len(self.ids):
            self.adapter_mean, self.adapter_cov = _moments(vectors.vectors(rows))

    def __len__(self) -> int:
        return len(self.ids)

    # ---- the bridge side
    def bridge_at(self, pos: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """Exact bridge scores of the segments at positions ``pos``."""
        return self.feats[pos] @ np.asarray(dist, np.float32)

    def bridge_top(self, dist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, exact scores) of the n best segments by the bridge, best first (ties: lower id)."""
        d = np.asarray(dist, np.float32)
        if self.low is None:
            pos = np.arange(len(self.ids))
        else:  # the projection's best, rescored exactly
            pos = _top(self.low @ (self.basis.T @ d), max(BRIDGE_CANDIDATES, n))
        return _best(pos, self.bridge_at(pos, d), n)

    def bridge_stats(self, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) over all segments of one query's bridge scores, as one-element arrays."""
        return _stats(np.asarray(dist, np.float64), self.bridge_mean, self.bridge_cov)

    # ---- the hybrid
    def hybrid_top(self, q: np.ndarray, dist: np.ndarray, weight: float, n: int,
                   candidates: int = HYBRID_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores) of the n best segments by ``atae.scoring.hybrid_scores`` over the whole
        library (corpus z-scores), found among the adapter's and the bridge's top ``candidates``."""
        m = max(candidates, n)
        _, hits = self.index.search(q, m)
        graph = np.searchsorted(self.ids, hits)
        graph = graph[(graph < len(self.ids)) & (self.ids[np.minimum(graph, len(self.ids) - 1)] == hits)]
        pos = np.union1d(graph, self.bridge_top(dist, m)[0])
        a = self.index.scores_at(q, self.rows[pos])
        h = scoring.hybrid_scores(a[None], self.bridge_at(pos, dist)[None], weight,
                                  adapter_stats=_stats(np.asarray(q, np.float64), self.adapter_mean,
                                                       self.adapter_cov),
                                  bridge_stats=self.bridge_stats(dist))[0]
        return _best(pos, h, n)


def _moments(x: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance of the rows of x (float64 sums of float32 chunk products)."""
    n, d = x.shape
    if n == 0:
        return np.zeros(d), np.zeros((d, d))
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d))
    for a in range(0, n, chunk):
        c = (x[a:a + chunk] - mean).astype(np.float32)
        cov += c.T @ c
    return mean, cov / n


def _stats(v: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([v @ mean]), np.array([np.sqrt(max(float(v @ cov @ v), 0.0))])


def _top(s: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest of s (any order)."""
    return np.arange(len(s)) if n >= len(s) else np.argpartition(-s, n - 1)[:n]


def _best(pos: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best (positions, scores), best first; ties to the lower position (= lower segment id)."""
    order = np.lexsort((pos, -np.asarray(s)))[:n]
    return pos[order], np.asarray(s, np.float32)[order]
