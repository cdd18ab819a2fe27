"""Text scorers for a library: the trained adapter, the zero-shot AudioSet tag bridge, and their hybrid.

Names (the same on the CLI, in the web page and in ``Library.search(..., scorer=...)``):

* ``adapter`` (alias ``model``): the library's own vector space, i.e. the trained model's cosine.
* ``bridge``: ``atae.bridge.TagBridge`` over the AudioSet tags stored per segment at index time (no
  training needed, no audio re-read). Temperature from the model's extras if a model is set, else the
  bridge default.
* ``hybrid``: the model's fusion of its cosine with the bridge (``atae.scoring.Fusion``).

A scorer object has ``top(library, text, n) -> (segment_ids, scores)`` (the n best segments, best first)
and ``score(library, text)`` (every scored segment, dense: the reference the fast path is tested
against). Both read the library's one ``SearchState`` (``Library.search_state``). Segments without tags
(a library indexed by an older atae, or files whose tags failed) are left out of bridge and hybrid
results; ``Library.scorers()`` counts them.
"""

from __future__ import annotations

import numpy as np

from atae import scoring
from atae.bridge import TagBridge, bridge_temperature
from atae.errors import AtaeError, QueryError

SCORER_NAMES = scoring.SCORERS
ALIASES = {"model": "adapter"}


def canonical(name: str) -> str:
    """The canonical scorer name ("model" -> "adapter"); QueryError for an unknown name."""
    n = ALIASES.get(name, name) if isinstance(name, str) else None
    if n not in SCORER_NAMES:
        raise QueryError(f"unknown scorer {name!r}", fix="use --scorer adapter, bridge or hybrid")
    return n


def unavailable(library) -> dict[str, str]:
    """{scorer name: why it cannot be used} for this library (absent names are available)."""
    why: dict[str, str] = {}
    no_model = "needs a trained model: index with `atae index DIR --db LIB --model RUN`"
    if not library.model_version:
        why["adapter"] = why["hybrid"] = no_model
    if library.db.has_segments() and not library.db.has_tags():
        head = (f"this library's audio tower ({library.stored_tower_info.name}) has no AudioSet head: "
                "index into a new --db with --audio-encoder efficientat-mn04 (or cnn14)")
        why["bridge"] = head
        why.setdefault("hybrid", head)
    return why


def preferred(names, untagged: int = 0) -> str | None:
    """The strongest of the available scorer names, the default everywhere (``Library.scorers``, the web
    page, `atae search`): ``hybrid`` (the trained model where it is sure, the tags elsewhere), else
    ``adapter``, else ``bridge``. With ``untagged`` segments (left out of bridge and hybrid results) a
    trained model searches alone."""
    order = ("adapter", "hybrid", "bridge") if untagged else ("hybrid", "adapter", "bridge")
    return next((n for n in order if n in names), None)


def default_scorer(library) -> str:
    """The library's default scorer (``preferred``), or an error saying why it can search no text."""
    name = library.scorers()["default"]
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
    state = library.scorers()
    why = state["unavailable"].get(name)
    if why is not None:
        raise QueryError(f"the {name!r} scorer is not available for this library: {why}", path=library.root,
                         fix="use --scorer " + " or ".join(state["available"] or ["(none)"]))


class BridgeScorer:
    """Zero-shot: rank segments by the AudioSet classes the query asks for (no training needed).
    ``text_tower``: the tower the bridge reads queries with (default: ``Library.tag_bridge``'s)."""

    name = "bridge"

    def __init__(self, text_tower=None):
        self.text_tower = text_tower

    def tag_bridge(self, library):
        if self.text_tower is None:
            return library.tag_bridge
        return TagBridge(self.text_tower, temperature=bridge_temperature(library.model))

    def _query(self, library, text: str):
        _require(library, self.name)
        dist = self.tag_bridge(library).query_distribution([text])[0]
        return library.search_state(), dist

    def score(self, library, text: str):
        """Every tagged segment's bridge score (dense)."""
        st, dist = self._query(library, text)
        return st.ids, st.bridge_at(None, dist).astype(np.float32)

    def top(self, library, text: str, n: int):
        """The n best segments (ids, scores), best first."""
        st, dist = self._query(library, text)
        pos, sc = st.bridge_top(dist, n)
        return st.ids[pos], sc


class HybridScorer(BridgeScorer):
    """The model's cosine and the bridge, each z-scored over the library's tagged segments, mixed by the
    model's fusion (``atae.scoring.Fusion``)."""

    name = "hybrid"

    def _query(self, library, text: str):
        _require(library, self.name)
        model = library.model
        try:
            scoring.check_hybrid_tower(model, library.stored_tower_info)
        except AtaeError as exc:
            raise QueryError(exc.message, path=library.root, fix=exc.fix) from exc
        tb = self.tag_bridge(library)
        sentences = tb.sentences([text])  # first: its text pass also fills the adapter tower's cache
        q = library.query_vector(text=text)
        weight = scoring.Fusion.of(model).weights(q[None])[0]
        st = library.search_state()
        library.readable_index()  # the bridge reads tags alone; the model's side needs the vectors
        return st, q, tb.distribution(sentences)[0], weight

    def score(self, library, text: str):
        """Every tagged segment's hybrid score (dense: ``atae.scoring.hybrid_scores`` over all of them)."""
        st, q, dist, w = self._query(library, text)
        a = st.index.scores_at(q, st.rows)
        return st.ids, scoring.hybrid_scores(a[None], st.bridge_at(None, dist)[None], w)[0]

    def top(self, library, text: str, n: int):
        """The n best segments by the hybrid, from the adapter's and the bridge's candidate lists."""
        st, q, dist, w = self._query(library, text)
        pos, sc = st.hybrid_top(q, dist, w, n)
        return st.ids[pos], sc


SCORERS = {"bridge": BridgeScorer(), "hybrid": HybridScorer()}
