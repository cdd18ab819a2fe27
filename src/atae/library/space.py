"""A library's vector space: which vectors are searched, the index file that holds them, and keeping that
index in step with SQLite's committed rows (a derived cache: rebuilt from the stored raw embeddings).

The *space* is ``model-<version>`` (a trained model's audio embeddings) or ``raw-<tower key>`` (the tower's
own embeddings, their element mean). The *store* holds them: ``faiss`` (the default: an index file,
``vectors.py``) or ``lance`` (a LanceDB table folder for tens of millions of segments, ``lance_vectors.py``).
Switching a library's store rebuilds its vectors from SQLite. ``Library`` inherits this; the indexer calls
the hooks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from atae.errors import AtaeError, LibraryError
from atae.library.vectors import HNSW_THRESHOLD, TOMBSTONE_REBUILD_FRACTION, VectorIndex, choose_kind


class VectorSpaceMixin:
    """The vector-space half of ``Library`` (it provides ``root``, ``db``, ``model``, ``index`` ...)."""

    @property
    def space(self) -> str:
        v = self.model_version
        return f"model-{v[:16]}" if v else f"raw-{self.audio_tower_key}"

    @property
    def index_path(self) -> Path:
        return self.root / f"vectors-{self.space}.{self.store}"

    def readable_index(self):
        """The vector index; a clear error while ``atae index`` rebuilds a Lance table (a reader finds none
        to read until the indexer has written it)."""
        if self.index is None:
            raise LibraryError(
                "this library's vectors are being rebuilt by `atae index` and cannot be read yet",
                path=self.index_path, fix="search again when the index run has finished")
        return self.index

    def _load_index(self):
        if self.store == "lance":
            from atae.library.lance_vectors import LanceIndex

            return LanceIndex.load(self.index_path, self._segment_meta)
        return VectorIndex.load(self.index_path)

    def _new_index(self, dim: int, kind: str):
        if self.store == "lance":
            from atae.library.lance_vectors import LanceIndex

            return LanceIndex.empty(self.index_path, dim, self._segment_meta)
        return VectorIndex.empty(dim, kind)

    def _segment_meta(self, ids) -> tuple[list, list, list, list]:
        """(paths, file durations, start_s, end_s) of segment ids, for a store that filters itself."""
        rows = self.db.segment_rows([int(i) for i in ids])
        got = [rows[int(i)] for i in ids]
        return ([r[1] for r in got], [r[2] if r[2] is not None else 0.0 for r in got],
                [r[3] for r in got], [r[4] for r in got])

    def _embed(self, seqs) -> np.ndarray:
        """Search vectors (n, D) for raw tower sequences [(T_i, F)]: the model's audio embedding, or without
        a model the element mean of the raw vectors."""
        m = self.model if self.model_version else None
        if m is None:
            return np.stack([np.asarray(s, dtype=np.float32).mean(axis=0) for s in seqs])
        return m.encode_audio(seqs)

    def _dim(self) -> int:
        if self.model_version:
            for _ids, seqs in self.db.iter_raw(batch=1):
                return self._embed(seqs[:1]).shape[1]
            return 0
        return int(self.stored_tower_info.dim)

    def _refresh(self, force: bool = False) -> None:
        """Make the in-memory index match SQLite's committed rows (load, then append/remove the diff)."""
        gen = self.db.generation()
        if not force and gen == self._gen and self.index is not None:
            return
        if self.store == "lance" and not self._writer.held:
            # the table on disk is shared with the indexer: read its latest version, and repair it only
            # while no indexer runs (a stale handle or a race would write rows twice)
            self.index = self._load_index()
            if not self._writer.try_acquire():
                if self.index is not None and self.index.ntotal == self.db.segment_count():
                    self._gen = gen  # the indexer has written every committed row
                return  # else not current: the next search reads the indexer's newer rows
            try:
                self._sync_index(gen)
            finally:
                self._writer.release()
            return
        self._sync_index(gen)

    def _sync_index(self, gen: int) -> None:
        changed = False
        live = self.db.segment_ids()
        if self.index is None:
            self.index = self._load_index()
        want = self._want_kind(len(live))
        dim = self._dim() if len(live) else None
        if self.index is None or (dim is not None and self.index.dim != dim) or self.index.kind != want:
            self.index = self._new_index(dim or 1, want)
            have = np.zeros(0, np.int64)
            changed = True
        else:
            have = self.index.ids()
        extra = np.setdiff1d(have, live, assume_unique=True)
        if len(extra):
            if self.index.remove(extra):
                changed = True
            elif len(extra) > TOMBSTONE_REBUILD_FRACTION * max(self.index.ntotal, 1):
                self.index = self._new_index(self.index.dim, want)
                have = np.zeros(0, np.int64)
                changed = True
        missing = np.setdiff1d(live, have, assume_unique=True)
        for ids, raw in self.db.iter_raw(missing if len(missing) < len(live) else None):
            self.index.add(ids, self._embed(raw))
            changed = True
        self._max_id = int(live[-1]) if len(live) else 0
        self._gen = gen
        if changed and len(live):
            # persist the repaired index only if no indexer is running (it owns the file then)
            if self._writer.held:
                self.save_index()
            elif self._writer.try_acquire():
                try:
                    self.save_index()
                except (AtaeError, OSError):
                    pass  # a reader's repair is a cache: searching goes on without persisting it
                finally:
                    self._writer.release()

    def _want_kind(self, n: int) -> str:
        if self.store == "lance":
            return "lance"
        if self.index_kind != "auto":
            return self.index_kind
        cur = self.index.kind if self.index is not None else None
        if cur == "hnsw" and n > HNSW_THRESHOLD // 2:  # hysteresis: no flapping around the threshold
            return "hnsw"
        return choose_kind("auto", n)

    def _remove_stale_index_files(self) -> None:
        for p in [*self.root.glob("vectors-*.faiss"), *self.root.glob("vectors-*.lance")]:
            if p == self.index_path:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    # --- hooks of the indexer (the only writer, holding the writer lock) -------------------------------
    def drop_vectors(self, ids: np.ndarray) -> None:
        """Forget the vectors of removed segments (HNSW keeps tombstones; searches skip ids SQLite no
        longer has)."""
        if self.index is not None and len(ids):
            self.index.remove(ids)

    def sync_new_vectors(self) -> None:
        """Append the vectors of the segments committed since the last call."""
        ids = self.db.segment_ids_after(self._max_id)
        if not len(ids):
            return
        if self.index is None or self.index.ntotal == 0:
            self._refresh(force=True)
            return
        for sid, raw in self.db.iter_raw(ids):
            self.index.add(sid, self._embed(raw))
        self._max_id = int(ids[-1])
        self._gen = self.db.generation()

    def save_index(self) -> None:
        """Persist the vectors (the FAISS file, atomically, or new rows folded into a Lance table's index)
        and remove the files of other spaces or stores, which this one replaced."""
        if self.index is not None and self.index.ntotal:
            self.index.save(self.index_path)
            self._remove_stale_index_files()
