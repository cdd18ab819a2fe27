"""Searching a library: text (through a scorer) or an example sound, one result per file, filters;
the scorers' shared state; explanations and "more like this". ``Library`` inherits this."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atae.errors import QueryError
from atae.library.results import Filters, SearchResult, check_k
from atae.query import clean_query

# Query by example uses the first EXAMPLE_MAX_S seconds of the sound: a few seconds describe a sound, and
# a long upload must cost no more than a short one.
EXAMPLE_MAX_S = 30.0


class QueryMixin:
    """The search half of ``Library`` (it provides ``db``, ``index``, ``model``, ``_lock`` ...)."""

    def query_vector(self, *, text: str | None = None, audio=None) -> np.ndarray:
        """The query's vector in the library's space (text needs a trained model)."""
        if (text is None) == (audio is None):
            raise QueryError("give exactly one of a text query or an example sound (audio=...)")
        if text is not None:
            text = clean_query(text)
            m = self.model if self.model_version else None
            if m is None:
                raise QueryError(
                    "text search needs a trained model, and this library was indexed without one",
                    path=self.root,
                    fix="train a model (atae train ...) and re-index with "
                    "`atae index DIR --db LIB --model RUN`, or use --scorer bridge",
                )
            return m.encode_text([self.text_tower.encode([text])[0]])[0]
        return self._embed([self.example_raw(audio)])[0]

    def example_raw(self, audio) -> np.ndarray:
        """The raw tower sequence (T, F) of an example sound (a path, or (wave, sample_rate)): its first
        ``EXAMPLE_MAX_S`` seconds. Decoding and encoding run outside the library lock (only the tower is
        looked up under it), so a long example never holds up other searches."""
        from atae.audio import load_audio

        with self._lock:
            tower = self.audio_tower
        if isinstance(audio, (str, Path)):
            wave = load_audio(audio, tower.sample_rate, duration_s=EXAMPLE_MAX_S)
        else:
            wave, sr = audio
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim == 2:
                wave = wave.mean(axis=1)
            wave = wave[: int(EXAMPLE_MAX_S * sr)]
            if sr != tower.sample_rate:
                import soxr

                wave = soxr.resample(wave, sr, tower.sample_rate).astype(np.float32)
        return np.asarray(tower.encode(wave).seq, dtype=np.float32)

    def search(
        self,
        text: str | None = None,
        *,
        audio=None,
        k: int = 10,
        min_duration: float | None = None,
        max_duration: float | None = None,
        glob: str | None = None,
        span: tuple[float, float] | None = None,
        scorer=None,
        explain: bool = False,
    ) -> list[SearchResult]:
        """Rank the library's files for a text query or an example sound; one result per file (its best
        segment). Filters (``results.Filters``): the file's duration, a glob (fnmatch) on its name or full
        path, ``span=(a, b)``: only segments inside seconds [a, b] of their file. ``scorer``: None or
        "adapter" (alias "model": the library's vector space), "bridge" / "hybrid" (zero-shot via AudioSet
        tags, ``scorers.py``), or any object with ``score(library, text) -> (segment_ids, scores)``
        (optionally ``top(library, text, n)``: the n best, for a fast exact top-k). ``explain``: fill each
        result's tags as ``explain`` does, with one text pass for the search and the explanation."""
        check_k(k)
        filters = Filters(min_duration, max_duration, glob, span)
        example = None
        if audio is not None and text is None and scorer is None:
            example = self.example_raw(audio)  # before taking the lock (see example_raw)
        with self._lock:
            self._refresh()
            scorer = self._resolve_scorer(scorer) if scorer is not None else None
            if text is not None:
                text = clean_query(text)
                if explain and scorer is None and "bridge" not in self.scorers()["unavailable"]:
                    # the explanation reads the text's last layer: that pass, run first, also gives the
                    # adapter its penultimate layer (the bridge and hybrid scorers already run it first)
                    self.tag_bridge.sentences([text])
            res = self._ranked(text, audio, example, scorer, k, filters)
        return self.explain(res, text=text) if explain else res

    def _ranked(self, text, audio, example, scorer, k: int, filters: Filters) -> list[SearchResult]:
        if scorer is not None:
            if text is None:
                raise QueryError("a scorer ranks text queries; drop --scorer for query by example")
            if hasattr(scorer, "top"):
                fetch = max(4 * k, 64)
                while True:
                    ids, scores = scorer.top(self, text, fetch)
                    res = self._collect(ids, scores, k, filters)
                    if len(res) >= k or len(ids) < fetch:
                        return res
                    fetch *= 4
            ids, scores = scorer.score(self, text)
            order = np.argsort(-np.asarray(scores), kind="stable")
            return self._collect(np.asarray(ids)[order], np.asarray(scores)[order], k, filters)
        if example is not None:
            q = self._embed([example])[0]
        else:
            q = self.query_vector(text=text, audio=audio)
        return self._nearest(q, k, filters)

    def _nearest(self, q: np.ndarray, k: int, filters: Filters, skip_files=frozenset()) -> list[SearchResult]:
        """The k files nearest the vector ``q`` in the index (each at its best segment) that pass
        ``filters``, leaving out ``skip_files``: more hits are fetched until k are found or none are left."""
        index = self.readable_index()
        n = index.ntotal
        if n == 0:
            return []
        fetch, where = max(4 * k, 64), filters.to_sql()
        while True:
            scores, ids = index.search(q, fetch, where=where)
            res = self._collect(ids, scores, k, filters, skip_files)
            # fewer hits than asked for: none are left (a store that filters in the search has found
            # every match), so a wider search would return the same
            if len(res) >= k or fetch >= n or len(ids) < fetch:
                return res
            fetch *= 4

    def _collect(self, ids, scores, k: int, filters: Filters, skip_files=frozenset()) -> list[SearchResult]:
        """The first k files among ranked segments (each file at its best segment) that pass ``filters``
        and are not in ``skip_files``."""
        rows = self.db.segment_rows([int(i) for i in ids])
        best: dict[int, SearchResult] = {}
        for sid, sc in zip(ids, scores, strict=True):
            r = rows.get(int(sid))
            if r is None:  # tombstone: removed since the index was built
                continue
            fid, path, dur, a, b = r
            if fid in best or fid in skip_files or not filters.accepts(path, dur, a, b):
                continue
            best[fid] = SearchResult(len(best) + 1, float(sc), path, dur, float(a), float(b), int(fid),
                                     int(sid))
            if len(best) >= k:
                break
        return list(best.values())

    def _resolve_scorer(self, scorer):
        """None for the adapter (the library's own vector space), a scorer object, or a name in
        ``scorers.SCORERS``."""
        if hasattr(scorer, "score"):
            return scorer
        from atae.library import scorers

        name = scorers.canonical(scorer)
        return None if name == "adapter" else scorers.SCORERS[name]

    def scorers(self) -> dict:
        """{"available": [names], "default": name or None, "unavailable": {name: why}, "untagged": n} for
        UIs; ``untagged``: segments that bridge and hybrid results leave out (no AudioSet tags)."""
        from atae.library import scorers

        with self._lock:
            key = (self.db.generation(), self.model_version)
            if self._unavailable is None or self._unavailable[0] != key:  # the web page asks per search
                why = scorers.unavailable(self)
                untagged = self.db.count_untagged() if "bridge" not in why else 0
                self._unavailable = (key, why, untagged)
            why = dict(self._unavailable[1])
            names = [n for n in scorers.SCORER_NAMES if n not in why]
            return {"available": names, "default": scorers.preferred(names, self._unavailable[2]),
                    "unavailable": why,
                    "untagged": self._unavailable[2]}

    @property
    def tag_bridge(self):
        """The zero-shot bridge of this library: the model's text tower (else the default MiniLM) and the
        model's tuned temperature (else the default)."""
        from atae import bridge

        with self._lock:
            if self._tag_bridge is None or self._tag_bridge[0] != self.model_version:
                model = self.model if self.model_version else None
                tower = self._text_tower or self.text_tower
                if tower is None:
                    from atae.towers.registry import get_text_tower

                    tower = get_text_tower("minilm", layer=bridge.BRIDGE_TEXT_LAYER, device=self.device)
                tb = bridge.TagBridge(tower, temperature=bridge.bridge_temperature(model))
                self._tag_bridge = (self.model_version, tb)
            return self._tag_bridge[1]

    def search_state(self):
        """The ``SearchState`` of the current generation (built on first use, shared by the scorers)."""
        from atae.library.search import SearchState

        with self._lock:
            self._refresh()
            n = self.index.ntotal if self.index is not None else None  # None: a Lance table being rebuilt
            key = (self.db.generation(), self.model_version, id(self.index), n)
            if self._state is None or self._state[0] != key:
                ids, tags = self.db.tags_matrix()
                if tags is None:
                    tags = np.zeros((0, 527), np.float32)
                vi = self.index if self.model_version and len(ids) and n is not None else None
                self._state = (key, SearchState(ids, tags, vi, vi.rows_of(ids) if vi is not None else None))
            return self._state[1]

    # --- result details: why a result matched, more like this (explain.py, similar.py) ---------------
    def explain(self, results: list[SearchResult], *, text: str | None = None) -> list[SearchResult]:
        """Fill each result's ``tags``: the segment's top AudioSet tags, with those that carried the text
        query marked ``matched`` (no text: nothing marked). A no-op when the tower has no AudioSet head."""
        from atae.library import explain

        query = clean_query(text) if text is not None else None
        with self._lock:
            tags = self.db.segment_tags([r.segment_id for r in results]) if results else {}
            # a text's label distribution only when some result has tags to explain
            dist = self.tag_bridge.query_distribution([query])[0] if query is not None and tags else None
            explain.attach(results, tags, dist)
        return results

    def similar(self, segment_ids, *, k: int = 10, **filters) -> list[SearchResult]:
        """More like this: the k files nearest the given segments (their own file left out); no model or
        audio decoding needed; ``filters``: ``min_duration``, ``max_duration``, ``glob`` as in ``search``.
        See ``atae.library.similar``."""
        from atae.library.similar import similar

        ids = [segment_ids] if isinstance(segment_ids, (int, np.integer)) else segment_ids
        return similar(self, ids, k=k, **filters)

    def segments_at(self, path: str | Path, seconds: float | None = None) -> list[int]:
        """The segment ids of an indexed file (at ``seconds``: the one nearest that time)."""
        from atae.library.similar import segments_at

        return segments_at(self, str(path), seconds)
