"""``Library``: open, index and search a sound library (the Python API behind ``atae index/search/serve``).

On disk a library is a folder::

    LIB/library.sqlite            metadata, segments, raw tower embeddings, tag probabilities (db.py)
    LIB/vectors-<space>.faiss     search vectors of the current space (vectors.py), derived from SQLite
    LIB/lock                      writer lock (lock.py)
    LIB/cache/                    waveform thumbnails of the web page

The *space* is the vector space searched: ``model-<version>`` (a trained model's adapted audio
embeddings; text queries go through the model's text tower and adapter) or ``raw-<tower key>`` (the
tower's own embeddings: query by example only, or a zero-shot scorer such as the AudioSet tag bridge).
Changing the model re-embeds the stored raw vectors; the tower never runs again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from atae.errors import AtaeError, LibraryError, ModelError, QueryError
from atae.library import indexer as _indexer
from atae.library.db import LibraryDB
from atae.library.lock import WriterLock
from atae.library.vectors import HNSW_THRESHOLD, TOMBSTONE_REBUILD_FRACTION, VectorIndex, choose_kind
from atae.query import clean_query


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


def model_dir_checksum(run_dir: str | Path) -> str:
    """A trained model's version: sha256 of its ``config.json`` and ``adapters.safetensors`` (what
    ``AlignedModel.load`` reads; logs, curves and checkpoints beside them do not count)."""
    h = hashlib.sha256()
    root = Path(run_dir)
    files = [root / "config.json", root / "adapters.safetensors"]
    if not all(p.is_file() for p in files):
        files = sorted(x for x in root.rglob("*") if x.is_file())
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _object_version(model) -> str:
    v = getattr(model, "version", None)
    if v:
        return str(v)
    h = hashlib.sha256()
    sd = model.state_dict() if hasattr(model, "state_dict") else {}
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _same_tower(a, b) -> bool:
    return a.name == b.name and a.dim == b.dim and a.weights_sha256 == b.weights_sha256


_OWN_FILES = {"library.sqlite", "library.sqlite-wal", "library.sqlite-shm", "lock", "cache"}
# Query by example uses the first EXAMPLE_MAX_S seconds of the sound: a few seconds describe a sound, and
# a long upload must cost no more than a short one.
EXAMPLE_MAX_S = 30.0


class Library:
    """A sound library. Use ``Library.open``; thread-safe for searches (one internal lock)."""

    def __init__(self, root: Path, db: LibraryDB, *, audio_tower=None, text_tower=None):
        self.root = Path(root)
        self.db = db
        self._audio_tower = audio_tower
        self._text_tower = text_tower
        self._model = None
        self._unavailable: tuple | None = None  # ((generation, model version), {name: why, ...})
        self._state: tuple | None = None  # (key, SearchState) of the text scorers
        self._tag_bridge: tuple | None = None  # (model version, TagBridge)
        self._lock = threading.RLock()
        self._writer = WriterLock(self.root)
        self.index: VectorIndex | None = None
        self._gen = -1
        self._max_id = 0
        s = db.get_meta_json("settings") or {}
        self.long_s = float(s.get("long_s", _indexer.LONG_S))
        self.window_s = float(s.get("window_s", _indexer.WINDOW_S))
        self.hop_s = float(s.get("hop_s", _indexer.HOP_S))
        self.index_kind = s.get("index", "auto")

    # --- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        create: bool = False,
        audio_encoder: str | None = None,
        audio_weights: str | Path | None = None,
        audio_tower=None,
        text_tower=None,
        model=None,
        window_s: float | None = None,
        hop_s: float | None = None,
        long_s: float | None = None,
        index: str | None = None,
    ) -> Library:
        """Open the library at ``path`` (``create=True`` makes it if missing).

        ``model``: a trained model directory (or an ``AlignedModel``-like object): the library's vectors
        become its audio embeddings (re-embedded from the stored raw vectors if it changed).
        ``audio_encoder``/``audio_weights``/``audio_tower``: the tower for new libraries (default: the
        model's tower with the weights it was trained on, else ``best_audio_tower()``); an existing library
        must keep its tower.
        """
        root = Path(path).expanduser()
        exists = (root / "library.sqlite").exists()
        if not exists and not create:
            raise LibraryError("no library here", path=root, fix="create it with `atae index DIR --db LIB`")
        if root.exists() and not root.is_dir():
            raise LibraryError("this is a file, not a library folder", path=root,
                               fix="give --db a folder (new or made by `atae index`)")
        model_obj, model_dir = cls._resolve_model(model)  # a bad model creates nothing
        if create and not exists:
            if root.exists() and any(p.name not in _OWN_FILES for p in root.iterdir()):
                raise LibraryError("this folder exists and is not an atae library", path=root,
                                   fix="give --db a new or empty folder (the library is a folder of its own)")
            root.mkdir(parents=True, exist_ok=True)
        db = LibraryDB(root, create=create)
        try:
            lib = cls(root, db, audio_tower=audio_tower, text_tower=text_tower)
            if db.get_meta("audio_tower") is None:  # new (or never finished): fix its settings
                if not create:  # reading never sets a library up, so the unfinished command can finish it
                    raise LibraryError(
                        "this library is unfinished: an `atae index` into it stopped before it was set up",
                        path=root,
                        fix="run the same `atae index DIR --db LIB` command again to finish setting it up",
                    )
                lib._init_settings(audio_encoder, audio_weights, model_obj, window_s, hop_s, long_s, index)
            else:
                lib._check_settings(audio_encoder, window_s, hop_s, long_s, index)
            with lib._lock:
                if model_obj is not None and lib._model_version_of(model_obj, model_dir) != lib.model_version:
                    lib.set_model(model_obj, model_dir=model_dir)
                elif model_obj is not None:
                    lib._model = model_obj
                lib._refresh(force=True)
        except BaseException:
            db.close()
            raise
        return lib

    def close(self) -> None:
        self._writer.release()
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @staticmethod
    def _resolve_model(model):
        if model is None:
            return None, None
        if isinstance(model, (str, Path)):
            from atae.model import AlignedModel

            d = Path(model).expanduser()
            if not d.is_dir():
                raise ModelError(
                    "model directory not found", path=d, fix="pass the --out folder of `atae train`"
                )
            return AlignedModel.load(d), str(d.resolve())
        return model, None

    def _init_settings(self, audio_encoder, audio_weights, model, window_s, hop_s, long_s, index) -> None:
        if self._audio_tower is None:
            from atae.towers.registry import best_audio_tower, get_audio_tower

            name = audio_encoder or (model.audio_info.name if model is not None else None)
            if model is not None and name == model.audio_info.name:
                from atae.towers.trained_with import weights_for

                remembered = (getattr(model, "weights_files", None) or {}).get("audio")
                audio_weights = weights_for(model.audio_info, explicit=audio_weights, remembered=remembered)
            self._audio_tower = get_audio_tower(name or best_audio_tower(), weights=audio_weights)
            audio_weights = getattr(self._audio_tower, "weights_path", None) or audio_weights
        info = self._audio_tower.info
        settings = {
            "long_s": long_s or _indexer.LONG_S,
            "window_s": window_s or _indexer.WINDOW_S,
            "hop_s": hop_s or _indexer.HOP_S,
            "index": index or "auto",
        }
        choose_kind(settings["index"], 0)
        if settings["hop_s"] <= 0 or settings["window_s"] <= 0 or settings["hop_s"] > settings["window_s"]:
            raise LibraryError(
                "window and hop must be positive and hop <= window", fix="e.g. --window 10 --hop 5"
            )
        with self.db.transaction():
            self.db.set_meta("audio_tower", info.to_dict(), as_json=True)
            self.db.set_meta("audio_weights", str(audio_weights) if audio_weights else "")
            self.db.set_meta("settings", settings, as_json=True)
        self.long_s, self.window_s, self.hop_s = settings["long_s"], settings["window_s"], settings["hop_s"]
        self.index_kind = settings["index"]

    def _check_settings(self, audio_encoder, window_s, hop_s, long_s, index) -> None:
        stored = self.stored_tower_info
        if audio_encoder and audio_encoder != stored.name:
            raise LibraryError(
                f"this library was indexed with the {stored.name!r} audio encoder, not {audio_encoder!r}",
                path=self.root,
                fix="use another --db for another encoder",
            )
        s = self.db.get_meta_json("settings") or {}
        for name, v in (("window_s", window_s), ("hop_s", hop_s), ("long_s", long_s)):
            if v is not None and float(v) != float(s.get(name)):
                raise LibraryError(
                    f"this library uses {name}={s.get(name)}, not {v}",
                    path=self.root,
                    fix="keep the library's windowing, or index into a new --db",
                )
        if index is not None and index != self.index_kind:
            choose_kind(index, 0)
            s["index"] = index
            with self.db.transaction():
                self.db.set_meta("settings", s, as_json=True)
            self.index_kind = index

    # --- towers and model -----------------------------------------------------------------------------
    @property
    def stored_tower_info(self):
        from atae.towers.base import TowerInfo

        try:
            return TowerInfo.from_dict(self.db.get_meta_json("audio_tower"))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise LibraryError("the library's 'audio_tower' record is corrupt", path=self.root,
                               fix="restore the library from a backup, or index into a new --db") from None

    @property
    def audio_tower_key(self) -> str:
        return self.stored_tower_info.key()

    @property
    def audio_tower(self):
        if self._audio_tower is None:
            from atae.towers.registry import get_audio_tower
            from atae.towers.trained_with import weights_for

            info = self.stored_tower_info
            found = weights_for(info, remembered=self.db.get_meta("audio_weights") or None)
            self._audio_tower = get_audio_tower(info.name, weights=found)
        if not _same_tower(self._audio_tower.info, self.stored_tower_info):
            raise LibraryError(
                f"the audio tower {self._audio_tower.info.name} "
                f"({self._audio_tower.info.weights_sha256}) is not the one this library was "
                f"indexed with ({self.stored_tower_info.weights_sha256})",
                path=self.root,
                fix="restore the original weights, or index into a new --db",
            )
        return self._audio_tower

    @property
    def model_version(self) -> str | None:
        return self.db.get_meta("model_version") or None

    @property
    def model_dir(self) -> str | None:
        return self.db.get_meta("model_dir") or None

    @property
    def model(self):
        """The trained model whose space the vectors live in (loaded lazily), or None (raw space)."""
        if self._model is None and self.model_version:
            d = self.model_dir
            if not d or not Path(d).is_dir():
                raise ModelError(
                    "the model this library was indexed with is missing",
                    path=d,
                    fix="restore it, or re-index with `atae index DIR --db LIB --model RUN`",
                )
            from atae.model import AlignedModel

            m = AlignedModel.load(d)
            if model_dir_checksum(d) != self.model_version:
                raise ModelError(
                    "the model directory changed since the library was indexed",
                    path=d,
                    fix="re-index with `atae index DIR --db LIB --model RUN` to re-embed",
                )
            self._model = m
        return self._model

    def _model_version_of(self, model, model_dir) -> str:
        return model_dir_checksum(model_dir) if model_dir else _object_version(model)

    def set_model(self, model, *, model_dir: str | None = None) -> None:
        """Switch the searched space to ``model`` (a dir or object): re-embeds the stored raw vectors."""
        if isinstance(model, (str, Path)):
            model, model_dir = self._resolve_model(model)
        if model is not None and not _same_tower(model.audio_info, self.stored_tower_info):
            raise ModelError(
                f"the model was trained on {model.audio_info.name} features but this library "
                f"holds {self.stored_tower_info.name} features",
                path=model_dir,
                fix="index into a new --db with this model's audio encoder",
            )
        version = None if model is None else self._model_version_of(model, model_dir)
        with self._lock, self._write():
            self._model = model
            with self.db.transaction():
                self.db.set_meta("model_version", version or "")
                self.db.set_meta("model_dir", model_dir or "")
                self.db.set_model_version(version)
            self.index = None
            self._refresh(force=True)
            self._remove_stale_index_files()

    @property
    def text_tower(self):
        if self._text_tower is None:
            m = self.model
            if m is None:
                return None
            from atae.towers.registry import get_text_tower
            from atae.towers.trained_with import weights_for

            found = weights_for(m.text_info, remembered=(getattr(m, "weights_files", None) or {}).get("text"))
            self._text_tower = get_text_tower(m.text_info.name, found)
            if not _same_tower(self._text_tower.info, m.text_info):
                raise ModelError(
                    f"the text tower {m.text_info.name} found here is not the one the model was trained with",
                    path=self.model_dir,
                    fix="install the model's text weights",
                )
        return self._text_tower

    # --- the vector space ---------------------------------------------------------------------------
    @property
    def space(self) -> str:
        v = self.model_version
        return f"model-{v[:16]}" if v else f"raw-{self.audio_tower_key}"

    @property
    def index_path(self) -> Path:
        return self.root / f"vectors-{self.space}.faiss"

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
        changed = False
        live = self.db.segment_ids()
        if self.index is None:
            self.index = VectorIndex.load(self.index_path)
        want = self._want_kind(len(live))
        dim = self._dim() if len(live) else None
        if self.index is None or (dim is not None and self.index.dim != dim) or self.index.kind != want:
            self.index = VectorIndex.empty(dim or 1, want) if dim else VectorIndex.empty(1, want)
            have = np.zeros(0, np.int64)
            changed = True
        else:
            have = self.index.ids()
        extra = np.setdiff1d(have, live, assume_unique=True)
        if len(extra):
            if self.index.remove(extra):
                changed = True
            elif len(extra) > TOMBSTONE_REBUILD_FRACTION * max(self.index.ntotal, 1):
                self.index = VectorIndex.empty(self.index.dim, want)
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
        if self.index_kind != "auto":
            return self.index_kind
        cur = self.index.kind if self.index is not None else None
        if cur == "hnsw" and n > HNSW_THRESHOLD // 2:  # hysteresis: no flapping around the threshold
            return "hnsw"
        return choose_kind("auto", n)

    def _remove_stale_index_files(self) -> None:
        for p in self.root.glob("vectors-*.faiss"):
            if p != self.index_path:
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
        """Write the FAISS file (atomically)."""
        if self.index is not None and self.index.ntotal:
            self.index.save(self.index_path)

    @contextlib.contextmanager
    def _write(self, *, wait: bool = False):
        """Hold the writer lock (``wait``: queue behind another indexer instead of refusing)."""
        self._writer.acquire(wait=wait)
        try:
            yield self
        finally:
            self._writer.release()

    # --- indexing ------------------------------------------------------------------------------------
    def add(
        self,
        paths,
        *,
        exts=None,
        progress: bool = False,
        wait: bool = False,
        batch_files: int = _indexer.BATCH_FILES,
    ) -> _indexer.IndexReport:
        """Index (or update) folders/files incrementally; see ``atae.library.indexer`` for the rules.
        Raises ``LibraryError`` if another process is indexing this library (``wait=True`` queues)."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        with self._lock:
            with self._write(wait=wait):
                self._refresh(force=True)
                rep = _indexer.run_index(self, paths, exts=exts, progress=progress, batch_files=batch_files)
                self._refresh(force=True)  # also switches flat <-> hnsw when the size crossed the threshold
        return rep

    def prune(self, *, dry_run: bool = False, wait: bool = False) -> list[str]:
        """Remove the files that are no longer on disk (anywhere in the library, e.g. under a folder that
        was renamed or deleted) with their vectors; returns their paths. A file that merely cannot be
        checked (no permission, I/O error) is kept. ``dry_run``: only list them."""
        with self._lock, self._write(wait=wait):
            gone = _indexer.prune(self, dry_run=dry_run)
            if gone and not dry_run:
                self._refresh(force=True)
                self.save_index()
        return gone

    def stats(self) -> dict:
        with self._lock:
            c = self.db.counts()
        c.update(
            {
                "root": str(self.root),
                "space": self.space,
                "model_dir": self.model_dir,
                "audio_tower": self.stored_tower_info.name,
                "index": self.index.kind if self.index is not None else None,
                "window_s": self.window_s,
                "hop_s": self.hop_s,
                "long_s": self.long_s,
            }
        )
        return c

    def failed(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.path, r.error or "") for r in self.db.failed_files()]

    def file(self, file_id: int):
        """The FileRow of an indexed file id (None if unknown): the web server serves audio only by id."""
        with self._lock:
            return self.db.file(file_id)

    # --- search --------------------------------------------------------------------------------------
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
        scorer=None,
    ) -> list[SearchResult]:
        """Rank the library's files for a text query or an example sound; one result per file (its best
        segment). ``glob`` (fnmatch) must match the file name or its full path. ``scorer``: None or
        "adapter" (alias "model": the library's vector space), "bridge" / "hybrid" (zero-shot via AudioSet
        tags, ``scorers.py``), or any object with ``score(library, text) -> (segment_ids, scores)``
        (optionally ``top(library, text, n)``: the n best, for a fast exact top-k)."""
        if not isinstance(k, int) or k < 1 or k > 10_000:
            raise QueryError(f"k must be an integer between 1 and 10000, not {k!r}")
        example = None
        if audio is not None and text is None and scorer is None:
            example = self.example_raw(audio)  # before taking the lock (see example_raw)
        with self._lock:
            self._refresh()
            scorer = self._resolve_scorer(scorer) if scorer is not None else None
            if text is not None:
                text = clean_query(text)
            if scorer is not None:
                if text is None:
                    raise QueryError("a scorer ranks text queries; drop --scorer for query by example")
                if hasattr(scorer, "top"):
                    fetch = max(4 * k, 64)
                    while True:
                        ids, scores = scorer.top(self, text, fetch)
                        res = self._collect(ids, scores, k, min_duration, max_duration, glob)
                        if len(res) >= k or len(ids) < fetch:
                            return res
                        fetch *= 4
                ids, scores = scorer.score(self, text)
                order = np.argsort(-np.asarray(scores), kind="stable")
                return self._collect(
                    np.asarray(ids)[order], np.asarray(scores)[order], k, min_duration, max_duration, glob
                )
            if example is not None:
                q = self._embed([example])[0]
            else:
                q = self.query_vector(text=text, audio=audio)
            if self.index is None or self.index.ntotal == 0:
                return []
            fetch = max(4 * k, 64)
            while True:
                scores, ids = self.index.search(q, fetch)
                res = self._collect(ids, scores, k, min_duration, max_duration, glob)
                if len(res) >= k or fetch >= self.index.ntotal:
                    return res
                fetch *= 4

    def _collect(self, ids, scores, k, min_duration, max_duration, glob) -> list[SearchResult]:
        rows = self.db.segment_rows([int(i) for i in ids])
        best: dict[int, SearchResult] = {}
        for sid, sc in zip(ids, scores, strict=True):
            r = rows.get(int(sid))
            if r is None:  # tombstone: removed since the index was built
                continue
            fid, path, dur, a, b = r
            if fid in best:
                continue
            if min_duration is not None and (dur is None or dur < min_duration):
                continue
            if max_duration is not None and (dur is None or dur > max_duration):
                continue
            if glob and not (fnmatch.fnmatch(os.path.basename(path), glob) or fnmatch.fnmatch(path, glob)):
                continue
            best[fid] = SearchResult(
                len(best) + 1, float(sc), path, dur, float(a), float(b), int(fid), int(sid)
            )
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

                    tower = get_text_tower("minilm", layer=bridge.BRIDGE_TEXT_LAYER)
                tb = bridge.TagBridge(tower, temperature=bridge.bridge_temperature(model))
                self._tag_bridge = (self.model_version, tb)
            return self._tag_bridge[1]

    def search_state(self):
        """The ``SearchState`` of the current generation (built on first use, shared by the scorers)."""
        from atae.library.search import SearchState

        with self._lock:
            self._refresh()
            key = (self.db.generation(), self.model_version, id(self.index), self.index.ntotal)
            if self._state is None or self._state[0] != key:
                ids, tags = self.db.tags_matrix()
                if tags is None:
                    tags = np.zeros((0, 527), np.float32)
                vi = self.index if self.model_version and len(ids) else None
                self._state = (key, SearchState(ids, tags, vi, vi.rows_of(ids) if vi is not None else None))
            return self._state[1]

    # --- result details: why a result matched, more like this (explain.py, similar.py) ---------------
    def explain(self, results: list[SearchResult], *, text: str | None = None) -> list[SearchResult]:
        """Fill each result's ``tags``: the segment's top AudioSet tags, with those that carried the text
        query marked ``matched`` (no text: nothing marked). A no-op when the tower has no AudioSet head."""
        from atae.library import explain

        with self._lock:
            dist = explain.text_distribution(self, clean_query(text)) if text is not None else None
            explain.attach(self, results, dist)
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
