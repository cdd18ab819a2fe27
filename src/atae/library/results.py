"""What a library search returns, and the filters a search can apply to its results."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass

from atae.errors import QueryError


@dataclass
class SearchResult:
    rank: int
    score: float  # cosine similarity of the query with the file's best segment
    path: str
    duration: float | None  # seconds (whole file)
    start_s: float  # best-matching span in the file
    end_s: float
    file_id: int
    segment_id: int
    tags: list[dict] | None = None  # the segment's top AudioSet tags, "matched" = carried the query

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = round(float(self.score), 6)
        d["file_name"], d["folder"] = os.path.basename(self.path), os.path.dirname(self.path)
        d["missing"] = not os.path.isfile(self.path)  # deleted or moved since it was indexed
        return d


def check_k(k) -> None:
    """A search asks for 1 to 10000 results."""
    if not isinstance(k, int) or k < 1 or k > 10_000:
        raise QueryError(f"k must be an integer between 1 and 10000, not {k!r}")


@dataclass(frozen=True)
class Filters:
    """Conditions on a result: its file's duration (seconds), a glob (fnmatch) on the file name or full
    path (``/sounds/rain/*`` is a folder prefix), and ``span``: only segments lying inside seconds
    [a, b] of their file (e.g. the first minute of long recordings)."""

    min_duration: float | None = None
    max_duration: float | None = None
    glob: str | None = None
    span: tuple[float, float] | None = None

    def __post_init__(self):
        if self.span is not None:
            a, b = (float(x) for x in self.span)
            if not (0.0 <= a < b):
                raise QueryError(f"span {self.span!r} must be two times in seconds, 0 <= start < end",
                                 fix="e.g. span=(0, 60) for the first minute")
            object.__setattr__(self, "span", (a, b))

    def accepts(self, path: str, duration: float | None, start_s: float, end_s: float) -> bool:
        if self.min_duration is not None and (duration is None or duration < self.min_duration):
            return False
        if self.max_duration is not None and (duration is None or duration > self.max_duration):
            return False
        if self.glob and not (fnmatch.fnmatch(os.path.basename(path), self.glob)
                              or fnmatch.fnmatch(path, self.glob)):
            return False
        return self.span is None or (start_s >= self.span[0] - 1e-6 and end_s <= self.span[1] + 1e-6)

    def to_sql(self) -> str | None:
        """The filters as a SQL condition on a vector table's ``duration``, ``name``, ``path``,
        ``start_s``, ``end_s`` columns (``lance_vectors``), or None when there is none. A glob with a
        character class ([...]) has no LIKE form: it is left to ``accepts`` on the results."""
        parts = []
        if self.min_duration is not None:
            parts.append(f"duration >= {float(self.min_duration)!r}")
        if self.max_duration is not None:
            parts.append(f"duration <= {float(self.max_duration)!r}")
        if self.glob and "[" not in self.glob:
            like = _sql_string(self.glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                               .replace("*", "%").replace("?", "_"))
            parts.append(f"(name LIKE {like} ESCAPE '\\' OR path LIKE {like} ESCAPE '\\')")
        if self.span is not None:
            parts.append(f"start_s >= {self.span[0] - 1e-6!r} AND end_s <= {self.span[1] + 1e-6!r}")
        return " AND ".join(parts) or None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
