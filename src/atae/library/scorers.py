"""Zero-shot scorers for a library: the AudioSet tag bridge and the bridge + model hybrid.

A scorer is any object with ``score(library, text) -> (segment_ids, scores)``; ``Library.search(...,
scorer=...)`` takes one (or the names "bridge" / "hybrid", built here) and does the per-file grouping
and filtering. Both need a library indexed with a tagging tower (efficientat-*, cnn14): the tags are
stored per segment at index time, so no audio is re-read. Scoring is exact over every segment (one
(N, 527) product; about 1 ms per 10k segments).

* bridge: ``atae.bridge.TagBridge`` with the minilm sentence embedding (last layer, mean of tokens,
  which is the sentence-transformers embedding); temperature from the model's extras if a model is set.
* hybrid: z-scored mix of the model's cosine and the bridge score, weight from the model's extras.
"""

from __future__ import annotations

import numpy as np

from atae.errors import AtaeError, QueryError

BRIDGE_TEXT_TOWER = ("minilm", {"layer": -1})


def _bridge(library, text_tower=None):
    from atae import bridge

    if (
        not library.stored_tower_info.name
        or library.db.conn.execute("SELECT 1 FROM segments WHERE tags IS NOT NULL LIMIT 1").fetchone() is None
    ):
        if library.db.counts()["segments"] == 0:
            return None
        raise QueryError(
            f"this library's audio tower ({library.stored_tower_info.name}) has no AudioSet head, "
            "so zero-shot search is not possible",
            path=library.root,
            fix="index into a new --db with --audio-encoder efficientat-mn04 (or cnn14), or train "
            "a model (atae train ...) and index with --model RUN",
        )
    if text_tower is None:
        from atae.towers.registry import get_text_tower

        name, opts = BRIDGE_TEXT_TOWER
        text_tower = get_text_tower(name, **opts)
    m = library.model if library.model_version else None
    temp = float(
        (getattr(m, "extras", None) or {}).get(bridge.EXTRA_BRIDGE_TEMPERATURE, bridge.DEFAULT_TEMPERATURE)
    )
    return bridge.TagBridge(text_tower, temperature=temp)


class BridgeScorer:
    """Zero-shot: rank segments by the AudioSet classes the query asks for (no training needed)."""

    def __init__(self, text_tower=None):
        self.text_tower = text_tower
        self._tb = None
        self._tags = (None, None, -1)

    def _tag_matrix(self, library):
        gen = library.db.generation()
        if self._tags[2] != gen:
            ids, tags = library.db.tags_matrix()
            self._tags = (ids, tags, gen)
        return self._tags[0], self._tags[1]

    def bridge_scores(self, library, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self._tb is None:
            self._tb = _bridge(library, self.text_tower)
        ids, tags = self._tag_matrix(library)
        if self._tb is None or tags is None or not len(ids):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return ids, self._tb.scores([text], tags)[0]

    def score(self, library, text: str):
        return self.bridge_scores(library, text)


class HybridScorer(BridgeScorer):
    """Model cosine and bridge score, each z-scored over the library's segments, mixed by the weight the
    model stores (``atae.bridge.hybrid_weight``)."""

    def score(self, library, text: str):
        from atae import bridge

        m = library.model if library.model_version else None
        if m is None:
            raise QueryError(
                "the hybrid scorer needs a trained model",
                path=library.root,
                fix="index with --model RUN, or use --scorer bridge",
            )
        ids, b = self.bridge_scores(library, text)
        if not len(ids):
            return ids, b
        q = library.query_vector(text=text)
        vi = library.index
        all_ids = np.asarray(__import__("faiss").vector_to_array(vi.index.id_map), dtype=np.int64)
        vecs = vi.index.index.reconstruct_n(0, vi.ntotal)
        pos = {int(i): n for n, i in enumerate(all_ids)}
        keep = np.array([int(i) in pos for i in ids])
        ids, b = ids[keep], b[keep]
        qn = q / max(float(np.linalg.norm(q)), 1e-12)
        a = vecs[[pos[int(i)] for i in ids]] @ qn
        try:
            mixed = bridge.hybrid_scores(a[None], b[None], bridge.hybrid_weight(m))[0]
        except AtaeError as exc:
            raise QueryError(str(exc)) from exc
        return ids, mixed


SCORERS = {"bridge": BridgeScorer, "hybrid": HybridScorer}
