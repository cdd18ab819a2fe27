"""More like this: rank the library by similarity to sounds it already holds (no model, no audio read).

The query is the stored search vector of the chosen segment(s): the trained model's audio embedding, or
without a model the tower's own embedding (element mean), i.e. exactly what a query by example with the
same sound would compute, read from the FAISS index instead of re-running the tower. Several segments
(a whole long file) are averaged.

The source file itself is left out of the results, all of its segments: a sound designer asking for
"more like this" wants *other* sounds, and the neighbouring windows of a long recording would otherwise
fill the list with near copies of the query.
"""

from __future__ import annotations

import os

import numpy as np

from atae.errors import QueryError
from atae.library.results import Filters, check_k


class UnknownSegment(QueryError):
    """No indexed segment has this id (the web API answers 404)."""


def segments_at(library, path: str, seconds: float | None = None) -> list[int]:
    """The segment ids that stand for ``path`` (an indexed file) at ``seconds``: the segment whose
    centre is nearest that time, or every segment of the file when ``seconds`` is None."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    with library._lock:
        row = library.db.file_by_path(full)
        segs = library.db.file_segments(row.id) if row is not None and row.status == "ok" else []
    if not segs:
        raise QueryError(
            "this file is not in the library",
            path=full,
            fix="give a file the library indexed (atae index DIR --db LIB adds it), or search by an outside "
            "sound with --audio FILE",
        )
    if seconds is None:
        return [s[0] for s in segs]
    end = row.duration if row.duration is not None else max(b for _, _, b in segs)
    if not 0 <= seconds <= end:
        raise QueryError(
            f"the time {seconds:g} s is outside this file, which is {end:.1f} s long",
            path=full,
            fix=f"give a time from 0 to {end:.1f} s after the @, e.g. {os.path.basename(full)}@{end / 2:.1f}",
        )
    return [min(segs, key=lambda s: (abs((s[1] + s[2]) / 2 - seconds), s[0]))[0]]


def _rows(library, ids: list[int]) -> dict[int, tuple]:
    """``LibraryDB.segment_rows`` of the segments, or ``UnknownSegment`` for the first id the library
    lacks."""
    rows = library.db.segment_rows([s for s in ids if 0 < s < 2**63])
    for s in ids:
        if s not in rows:
            raise UnknownSegment(f"no indexed sound has the segment id {s}",
                                 fix="take the segment_id of a search result (the library may have changed "
                                     "since: search again)")
    return rows


def describe(library, segment_id: int) -> dict:
    """Where a segment is: ``{"segment_id", "file_id", "path", "file_name", "duration", "start_s",
    "end_s"}`` (``UnknownSegment`` if the library lacks it)."""
    with library._lock:
        fid, path, dur, a, b = _rows(library, [int(segment_id)])[int(segment_id)]
    return {"segment_id": int(segment_id), "file_id": int(fid), "path": path,
            "file_name": os.path.basename(path), "duration": dur, "start_s": float(a), "end_s": float(b)}


def similar(library, segment_ids, *, k: int = 10, min_duration: float | None = None,
            max_duration: float | None = None, glob: str | None = None, span=None):
    """``SearchResult``s of the k files most similar to the given segments (their own file left out),
    best first, each with its tags explained by what the segments share; filters as ``Library.search``."""
    from atae.library.explain import attach, example_distribution

    check_k(k)
    filters = Filters(min_duration, max_duration, glob, span)
    ids = [int(s) for s in segment_ids]
    if not ids:
        raise QueryError("no sound to search like", fix="give a segment id or an indexed file")
    with library._lock:
        library._refresh()
        files = {r[0] for r in _rows(library, ids).values()}
        index = library.readable_index()
        q = index.vectors(index.rows_of(np.asarray(ids, np.int64))).mean(axis=0)
        res = library._nearest(q, k, filters, skip_files=files)
        tags = library.db.segment_tags(ids + [r.segment_id for r in res])  # the sources' and the results'
    sources = set(ids)
    own = [t for i, t in tags.items() if i in sources]
    attach(res, tags, example_distribution(np.mean(own, axis=0)) if own else None)
    return res
