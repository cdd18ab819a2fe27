"""Why a result matched: a segment's strongest AudioSet tags, with the ones that carried the query marked.

A segment's zero-shot score is ``p . sqrt(t)`` (``atae.bridge``): label l contributes ``p_l * sqrt(t_l)``,
where p is the query's label distribution and t the segment's tag probabilities. The labels with the
largest contributions are what the query found in the sound, so they are the honest answer to "why
this one?"; a label the sound barely has (below ``MIN_PROB``) is never marked, so a weak result shows
no reason rather than a false one. The same reading serves every scorer (the trained model's cosine
has no per-label parts, but the tags that match the query are still what a listener checks), and an
example sound (``more like this``) uses its own tags as p, which marks the tags the two sounds share.

Shown per result: the ``TOP_TAGS`` most probable tags, plus any carrying label outside them (so the
reason is always visible), each as ``{"label", "prob", "matched"}``.
"""

from __future__ import annotations

import numpy as np

TOP_TAGS = 5
CARRY_SHARE = 0.15  # a label carries a match when it brings at least this share of the score
MIN_PROB = 0.1  # ... and the sound is tagged with it at least this surely (self-tagging's threshold)
MAX_CARRIED = 3


def explain(dist: np.ndarray | None, tags: np.ndarray, n: int = TOP_TAGS) -> list[dict]:
    """The tags to show for one segment (``tags``: its 527 probabilities) under a query's label
    distribution ``dist`` (None: no query to explain, nothing is marked)."""
    from atae.bridge import audioset_labels

    t = np.clip(np.asarray(tags, np.float64), 0.0, None)
    carried: list[int] = []
    if dist is not None:
        contrib = np.asarray(dist, np.float64) * np.sqrt(t)
        total = float(contrib.sum())
        if total > 0:
            best = np.argsort(-contrib, kind="stable")[:MAX_CARRIED]
            carried = [int(i) for i in best if contrib[i] >= CARRY_SHARE * total and t[i] >= MIN_PROB]
    top = [int(i) for i in np.argsort(-t, kind="stable")[:n]]
    shown = top + [i for i in carried if i not in top]
    labels = audioset_labels()
    return [{"label": labels[i], "prob": round(float(t[i]), 3), "matched": i in carried} for i in shown]


def example_distribution(tags: np.ndarray) -> np.ndarray | None:
    """An example sound's tags as a label distribution (what it "asks for"), or None if it has none."""
    t = np.clip(np.asarray(tags, np.float64), 0.0, None)
    s = float(t.sum())
    return t / s if s > 0 else None


def attach(results, tags: dict, dist: np.ndarray | None) -> None:
    """Fill ``tags`` of each ``SearchResult`` from ``tags`` ({segment id: its 527 probabilities}; a
    result whose segment has none keeps None)."""
    for r in results:
        t = tags.get(r.segment_id)
        if t is not None:
            r.tags = explain(dist, t)
