"""The FAISS side of the library: a derived, rebuildable cache of the search vectors.

* Vectors are L2-normalised and searched by inner product (= cosine similarity).
* Ids are segment ids from SQLite (``IndexIDMap2``), so a hit maps straight back to its row.
* Kind: ``flat`` (exact ``IndexFlatIP``) up to ``HNSW_THRESHOLD`` vectors, ``hnsw`` (``IndexHNSWFlat``)
  above it, unless a kind is forced: exact search grows with the library, HNSW stays nearly flat.
* HNSW parameters (``bench/bench_scale.py``; bench/results/scale.md): M=32, efConstruction=96, searched
  with efSearch=512, is the leanest graph that keeps recall@10 >= 0.98 against exact search at 100k and
  1M on both test sets (clustered synthetic vectors, and mixes of real mn04 clip embeddings through a
  trained adapter, queried with real captions) at about 1 ms per query. The former M=24/48 fell to 0.93
  (real captions, 100k) and 0.92 (synthetic, 1M); IVF-Flat also reaches the target but must be trained
  on the library and retrained as it grows. The parameters live in the saved index, so libraries built
  with other ones open as they are; only efSearch is set on load.
* HNSW cannot delete: removed ids stay in the graph as *tombstones* that the search drops (hits are
  looked up in SQLite anyway); the index is rebuilt when they pass 20 % of its size.
* Writes are atomic: ``faiss.write_index`` to a temp file in the same folder, fsync, ``os.replace``.
* ``Library._refresh`` (api.py) compares the index's ids with SQLite's and appends what is missing /
  removes what is gone, so the index is always consistent with the committed rows after a crash.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from atae.errors import LibraryError
from atae.io import atomic_path

HNSW_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 96
HNSW_EF_SEARCH = 512
TOMBSTONE_REBUILD_FRACTION = 0.2
# FAISS parallelises over queries: a single query gains nothing from OpenMP, and on a busy machine the
# idle team's synchronisation made it many times slower. Searches run on one thread; builds (many
# vectors) use every core.
_BUILD_THREADS = max(1, faiss.omp_get_max_threads())


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def choose_kind(kind: str, n: int) -> str:
    if kind == "auto":
        return "hnsw" if n > HNSW_THRESHOLD else "flat"
    if kind not in ("flat", "hnsw"):
        raise LibraryError(f"unknown index kind {kind!r}", fix="use --index auto, flat or hnsw")
    return kind


def new_index(dim: int, kind: str, *, m: int | None = None,
              ef_construction: int | None = None) -> faiss.Index:
    """An empty ``IndexIDMap2``; ``m`` / ``ef_construction`` override the HNSW defaults (benchmarks)."""
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, m or HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = ef_construction or HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        base = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(base)


class VectorIndex:
    """An ``IndexIDMap2`` plus the bookkeeping needed to keep it consistent with SQLite."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self._ids: np.ndarray | None = None
        base = faiss.downcast_index(index.index)
        self._kind = "hnsw" if isinstance(base, faiss.IndexHNSW) else "flat"
        self._store = faiss.downcast_index(base.storage) if self._kind == "hnsw" else base

    @classmethod
    def empty(cls, dim: int, kind: str) -> VectorIndex:
        return cls(new_index(dim, kind))

    @classmethod
    def load(cls, path: Path) -> VectorIndex | None:
        """The saved index, or None if absent or unreadable (the caller rebuilds it from SQLite)."""
        if not path.exists():
            return None
        try:
            idx = faiss.read_index(str(path))
        except RuntimeError:
            return None
        if not isinstance(idx, faiss.IndexIDMap2):
            return None
        vi = cls(idx)
        if vi.kind == "hnsw":
            faiss.downcast_index(idx.index).hnsw.efSearch = HNSW_EF_SEARCH
        return vi

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))
        return self._ids

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        faiss.omp_set_num_threads(_BUILD_THREADS if len(ids) >= 1000 else 1)
        self.index.add_with_ids(normalize(vecs), np.asarray(ids, dtype=np.int64))
        self._ids = None

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; returns False when the kind cannot delete (HNSW: they stay as tombstones)."""
        if len(ids) == 0:
            return True
        if self.kind == "hnsw":
            return False
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        self._ids = None
        return True

    def search(self, q: np.ndarray, k: int, where: str | None = None, *,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (k,), ids (k,)) for one query; fewer if the index is small. Ids of -1 are dropped.
        ``where`` (a store's SQL filter) is not used: FAISS holds no metadata, ``Library`` filters hits.
        ``ef_search``: the HNSW search breadth for this query (default ``HNSW_EF_SEARCH``; at least k)."""
        if self.ntotal == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        faiss.omp_set_num_threads(1)
        k = min(k, self.ntotal)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search or HNSW_EF_SEARCH, k))
            d, i = self.index.search(normalize(q), k, params=params)
        else:
            d, i = self.index.search(normalize(q), k)
        keep = i[0] >= 0
        return d[0][keep], i[0][keep]

    def _unit_query(self, q: np.ndarray) -> np.ndarray:
        qq = normalize(q)[0]
        if qq.shape[0] != self.dim:
            raise LibraryError(f"query has dimension {qq.shape[0]}, the index {self.dim}")
        return qq

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """FAISS row of each of ``ids`` (every one must be in the index)."""
        id_map = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        order = np.argsort(id_map, kind="stable")
        return order[np.searchsorted(id_map[order], np.asarray(ids, dtype=np.int64))]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) float32 copy of the stored (unit) vectors at FAISS rows ``rows``."""
        r = np.asarray(rows, dtype=np.int64)
        return self._store.reconstruct_batch(r) if r.size else np.zeros((0, self.dim), np.float32)

    def scores_at(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Inner product of ``q`` with the vectors at FAISS rows ``rows``, read in place (no copy)."""
        qq = self._unit_query(q)
        r = np.ascontiguousarray(rows, dtype=np.int64)
        if r.size and (r.min() < 0 or r.max() >= self._store.ntotal):
            raise LibraryError(f"row out of range for an index of {self._store.ntotal} vectors")
        out = np.empty(r.size, np.float32)
        if r.size:
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(qq), self._store.get_xb(),
                                             faiss.swig_ptr(r), self.dim, 1, r.size)
        return out

    def save(self, path: Path) -> None:
        """Atomic write: temp file in the same folder, fsync, rename over the old one."""
        try:
            with atomic_path(path, ".faiss") as tmp:
                faiss.write_index(self.index, tmp)
        except (OSError, RuntimeError) as exc:
            raise LibraryError(f"cannot write the vector index ({getattr(exc, 'strerror', None) or exc})",
                               path=path, fix="remove what is at this path (the index is rebuilt from "
                               "library.sqlite), or fix the folder's permissions") from exc
