"""What a library's text scorers search with, built once per library generation and shared by all of them.

``SearchState`` holds, for the segments that have AudioSet tags:

* their ids (sorted) and FAISS rows, so a candidate's adapter cosine is read from the index in place;
* their bridge tag features ``sqrt(tags)`` (``atae.bridge.tag_features``), float32, twice: one row per
  segment (to rescore candidates) and one row per label (so a query can read just the labels it weighs
  most; a column gather from the first costs ten times more);
* each side's corpus mean and covariance, so the hybrid's per-query z-scores over all segments are closed
  form (mean = v . mu, variance = v' C v) although only candidates are scored.

Memory: the two copies of the tag features take 4 kB a segment (420 MB at 100k segments).

Search rules (the results of ``atae.scoring`` on the whole library, up to the candidate lists):

* **bridge**: every segment scored when there are at most ``DENSE_LIMIT``; above, each segment gets a
  partial score from the ``BRIDGE_LABELS`` labels the query weighs most, and the ``BRIDGE_CANDIDATES``
  best by it are rescored exactly. (A query whose distribution sits on at most ``BRIDGE_LABELS`` labels
  is thereby exact.)
* **hybrid**: the union of the adapter's top ``HYBRID_CANDIDATES`` (the FAISS index: exact for a flat
  index, approximate for HNSW, searched there at ``HYBRID_EF_SEARCH``: the bridge's list makes up for
  what a narrower graph search misses) and the bridge's ``BRIDGE_CANDIDATES`` candidates, rescored exactly on
  both sides and mixed with the corpus z-scores. A segment outside both lists would have to rank low on
  both sides yet high on their mix. A query the novelty gate gives to the bridge alone (``Fusion``) is the
  bridge's search, z-scored.

``bench/bench_hybrid.py`` measured the recall of both rules against the dense computation on a 100k
library of real mn04 tags and chose the numbers (``bench/results/hybrid.json``); the graph's list and
efSearch are the smallest whose recall@10 and @64 stay within 0.01 of a 256 list at efSearch 512.
"""

from __future__ import annotations

import numpy as np
import torch

from atae import bridge as br
from atae import scoring

DENSE_LIMIT = 4096
BRIDGE_LABELS = 8
BRIDGE_CANDIDATES = 512
HYBRID_CANDIDATES = 128
HYBRID_EF_SEARCH = 128


class SearchState:
    """The search structures of one library generation (see the module docstring)."""

    def __init__(self, ids: np.ndarray, tags: np.ndarray, vectors=None, rows: np.ndarray | None = None):
        """``ids``: sorted segment ids with tags; ``tags``: their (n, 527) probabilities; ``vectors``: the
        library's ``VectorIndex`` (None: no adapter side); ``rows``: each id's row in it."""
        self.ids = np.asarray(ids, np.int64)
        self.feats = br.tag_features(tags)
        self.by_label = np.ascontiguousarray(self.feats.T)
        self.index, self.rows = vectors, rows
        self.bridge_mean, self.bridge_cov = _moments(self.feats)
        self.adapter_mean = self.adapter_cov = None
        if vectors is not None and len(self.ids):
            self.adapter_mean, self.adapter_cov = _moments(vectors.vectors(rows))

    def __len__(self) -> int:
        return len(self.ids)

    # ---- the bridge side
    def bridge_at(self, pos: np.ndarray | None, dist: np.ndarray) -> np.ndarray:
        """Exact bridge scores of the segments at positions ``pos`` (None: every segment)."""
        d = np.asarray(dist, np.float32)
        return d @ self.by_label if pos is None else self.feats[pos] @ d

    def bridge_candidates(self, dist: np.ndarray, m: int) -> np.ndarray:
        """Positions (ascending) of the m segments most likely to score best: by every segment's exact score
        up to ``DENSE_LIMIT`` segments (ties at the m-th place all kept), else by a partial score from the
        ``BRIDGE_LABELS`` labels ``dist`` weighs most."""
        d = np.asarray(dist, np.float32)
        if len(self.ids) <= DENSE_LIMIT:
            return _top(self.bridge_at(None, d), m)
        labels = np.argpartition(-d, BRIDGE_LABELS)[:BRIDGE_LABELS]
        partial = d[labels[0]] * self.by_label[labels[0]]
        for lab in labels[1:]:  # row by row: no copy of the label rows
            partial += d[lab] * self.by_label[lab]
        if m >= len(partial):
            return np.arange(len(partial))
        # torch's top-k selects in a third of the time of numpy's partition on a library-sized array
        return np.sort(torch.from_numpy(partial).topk(m, sorted=False).indices.numpy())

    def bridge_top(self, dist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, exact scores) of the n best segments by the bridge, best first (ties: lower id)."""
        pos = self.bridge_candidates(dist, max(BRIDGE_CANDIDATES, n))
        return _best(pos, self.bridge_at(pos, dist), n)

    def bridge_stats(self, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) over all segments of one query's bridge scores, as one-element arrays."""
        return _stats(dist, self.bridge_mean, self.bridge_cov)

    # ---- the hybrid
    def hybrid_top(self, q: np.ndarray, dist: np.ndarray, weight: float, n: int, *,
                   graph: int | None = None, bridge: int | None = None,
                   ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores) of the n best segments by ``atae.scoring.hybrid_scores`` over the whole
        library (corpus z-scores), found among the adapter index's top ``graph`` (default
        ``HYBRID_CANDIDATES``, searched over HNSW at ``ef_search``, default ``HYBRID_EF_SEARCH``) and the
        bridge's ``bridge`` candidates (default ``BRIDGE_CANDIDATES``). A query the novelty gate sent to the
        bridge alone (weight 0) ranks as the bridge does: its top, z-scored, with no graph search."""
        if weight == 0:
            pos, b = self.bridge_top(dist, n)
            return pos, scoring.zscore(b[None], self.bridge_stats(dist))[0].astype(np.float32)
        _, hits = self.index.search(q, max(graph or HYBRID_CANDIDATES, n),
                                    ef_search=ef_search or HYBRID_EF_SEARCH)
        near = np.searchsorted(self.ids, hits)
        near = near[(near < len(self.ids)) & (self.ids[np.minimum(near, len(self.ids) - 1)] == hits)]
        pos = np.union1d(near, self.bridge_candidates(dist, max(bridge or BRIDGE_CANDIDATES, n)))
        a = self.index.scores_at(q, self.rows[pos])
        h = scoring.hybrid_scores(a[None], self.bridge_at(pos, dist)[None], weight,
                                  adapter_stats=_stats(q, self.adapter_mean, self.adapter_cov),
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
    v = np.asarray(v, np.float64)
    return np.array([v @ mean]), np.array([np.sqrt(max(float(v @ cov @ v), 0.0))])


def _top(s: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the n largest of s, and of every value tied with the n-th."""
    if n >= len(s):
        return np.arange(len(s))
    return np.flatnonzero(s >= np.partition(s, len(s) - n)[len(s) - n])


def _best(pos: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best (positions, scores), best first; ties to the lower position (= lower segment id)."""
    order = np.lexsort((pos, -np.asarray(s)))[:n]
    return pos[order], np.asarray(s, np.float32)[order]
