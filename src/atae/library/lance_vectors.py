"""The LanceDB store of a library's search vectors (``atae index --store lance``), for libraries of tens of
millions of segments: an embedded Lance table (a folder beside the SQLite file), searched through an IVF-PQ
index with full-precision refine, filters pushed into the search as a SQL prefilter. Needs the optional
extra: ``pip install "atae[distributed]"``.

The same contract as ``vectors.VectorIndex`` (``Library`` keeps it in step with SQLite, the source of
truth, and can rebuild it from there): ids are segment ids, vectors are unit length, a search returns
cosine similarities. Each write is one Lance commit (atomic: a crash leaves the previous version).

* Below ``INDEX_MIN`` vectors the table is searched exactly (a scan); from there an IVF-PQ index is built
  (partitions about sqrt(n), 8 dimensions per PQ sub-vector, L2 distance, which on unit vectors ranks
  as the cosine does) and searched with ``NPROBES`` partitions and a ``REFINE`` x full-precision rerank.
  ``bench/bench_scale.py`` chose these at 1M segments (recall@10 0.986-0.998 against exact search).
* Vectors added after the index was built are searched exactly beside it until ``save`` (called by the
  indexer every minute and at the end) folds them in (``optimize``), which also compacts small commits.
* Each row carries its file's path, name and duration and the segment's span, so ``Filters`` run inside
  the search (``Filters.to_sql``) instead of over its results.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from atae.errors import LibraryError

TABLE = "vectors"
INDEX_MIN = 100_000
NPROBES = 20
REFINE = 30
ID_CHUNK = 1000


def require_lancedb():
    try:
        import lancedb
    except ImportError as exc:
        raise LibraryError("the LanceDB store is not installed",
                           fix='pip install "atae[distributed]", or use --store faiss') from exc
    return lancedb


def _schema(dim: int):
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim)), ("path", pa.string()),
                      ("name", pa.string()), ("duration", pa.float32()), ("start_s", pa.float32()),
                      ("end_s", pa.float32())])


class LanceIndex:
    """A library's vectors in a Lance table (see the module docstring). ``meta(ids)`` gives each id's
    (path, file duration, start_s, end_s), from SQLite."""

    kind = "lance"

    def __init__(self, path: Path, table, dim: int, meta):
        self.path, self.table, self._dim, self.meta = Path(path), table, int(dim), meta
        self._ids: np.ndarray | None = None

    @classmethod
    def empty(cls, path: Path, dim: int, meta) -> LanceIndex:
        """A new, empty table at ``path``; an earlier folder there (a damaged or outdated cache of the
        library's vectors, all of which SQLite holds) is removed first."""
        lancedb = require_lancedb()
        if Path(path).exists():
            shutil.rmtree(path)
        db = lancedb.connect(str(path))
        return cls(path, db.create_table(TABLE, schema=_schema(dim)), dim, meta)

    @classmethod
    def load(cls, path: Path, meta) -> LanceIndex | None:
        """The table at ``path``, or None when it is absent or unreadable (the caller rebuilds it)."""
        lancedb = require_lancedb()
        if not Path(path).is_dir():
            return None
        try:
            table = lancedb.connect(str(path)).open_table(TABLE)
            dim = table.schema.field("vector").type.list_size
            table.count_rows()
        except Exception:  # noqa: BLE001 - a half-written or foreign table is a cache to rebuild
            return None
        if not table.schema.equals(_schema(dim)):  # written by another version of atae: rebuild
            return None
        return cls(path, table, dim, meta)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self.table.count_rows())

    def ids(self) -> np.ndarray:
        if self._ids is None:
            n = self.ntotal
            ids = self._columns(["id"], n)["id"].to_numpy() if n else np.zeros(0, np.int64)
            self._ids = np.sort(np.asarray(ids, np.int64))
        return self._ids

    def _columns(self, names: list[str], n: int):
        """The given columns of every row (without reading the others: a table can be large)."""
        return self.table.search().select(names).limit(max(n, 1)).to_arrow()

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        import pyarrow as pa

        from atae.library.vectors import normalize

        if len(ids) == 0:
            return
        ids = np.asarray(ids, np.int64)
        x = normalize(vecs)
        paths, durations, starts, ends = self.meta(ids)
        self.table.add(pa.table({
            "id": pa.array(ids),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), self.dim),
            "path": pa.array(paths, pa.string()),
            "name": pa.array([Path(p).name for p in paths], pa.string()),
            "duration": pa.array(np.asarray(durations, np.float32)),
            "start_s": pa.array(np.asarray(starts, np.float32)),
            "end_s": pa.array(np.asarray(ends, np.float32)),
        }, schema=_schema(self.dim)))
        self._ids = None

    def remove(self, ids: np.ndarray) -> bool:
        ids = np.asarray(ids, np.int64)
        for a in range(0, len(ids), ID_CHUNK):
            self.table.delete(f"id IN ({', '.join(str(int(i)) for i in ids[a:a + ID_CHUNK])})")
        self._ids = None
        return True

    def search(self, q: np.ndarray, k: int, where: str | None = None, *,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosines (k,), ids (k,)) of the k nearest vectors passing the SQL ``where`` (a prefilter).
        ``ef_search`` (an HNSW setting) has no meaning here."""
        from atae.library.vectors import normalize

        if self.ntotal == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        s = self.table.search(normalize(q)[0]).distance_type("l2").limit(int(k)).select(["id", "_distance"])
        if self._indexed():
            s = s.nprobes(NPROBES).refine_factor(REFINE)
        if where:
            s = s.where(where, prefilter=True)
        r = s.to_arrow()
        d = np.asarray(r["_distance"].to_numpy(), np.float32)
        return (1.0 - d / 2.0).astype(np.float32), np.asarray(r["id"].to_numpy(), np.int64)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows are addressed by segment id in a table."""
        return np.asarray(ids, np.int64)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) stored vectors of the given ids, in their order."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        if len(rows) > ID_CHUNK:
            t = self._columns(["id", "vector"], self.ntotal)
        else:
            t = self.table.search().where(f"id IN ({', '.join(str(int(i)) for i in rows)})") \
                .select(["id", "vector"]).limit(len(rows)).to_arrow()
        have = np.asarray(t["id"].to_numpy(), np.int64)
        x = np.asarray(t["vector"].combine_chunks().flatten(), np.float32).reshape(-1, self.dim)
        order = np.argsort(have)
        pos = order[np.searchsorted(have[order], rows)]
        if not np.array_equal(have[pos], rows):
            raise LibraryError("a segment asked for is not in the vector table", path=self.path,
                               fix="run `atae index` on the library again")
        return x[pos]

    def scores_at(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        from atae.library.vectors import normalize

        return self.vectors(rows) @ normalize(q)[0]

    def save(self, path: Path | None = None) -> None:
        """Fold new rows into the index (building it once the table is large enough) and compact small
        commits; every write is already durable."""
        n = self.ntotal
        if n >= INDEX_MIN and not self._indexed():
            from lancedb.index import IvfPq

            partitions = int(min(4096, max(1, round(math.sqrt(n)))))
            self.table.create_index("vector", config=IvfPq(distance_type="l2", num_partitions=partitions,
                                                            num_sub_vectors=max(1, self.dim // 8)))
        elif n:
            self.table.optimize()

    def _indexed(self) -> bool:
        return any(getattr(i, "columns", None) == ["vector"] for i in self.table.list_indices())
