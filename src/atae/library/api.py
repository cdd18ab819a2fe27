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
import hashlib
import threading
from pathlib import Path

from atae.errors import LibraryError, ModelError
from atae.library import indexer as _indexer
from atae.library.db import LibraryDB, unfinished
from atae.library.lock import WriterLock
from atae.library.querying import QueryMixin
from atae.library.space import VectorSpaceMixin
from atae.library.vectors import VectorIndex, choose_kind


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
    """Same name, size, weights and every option both record (older records may lack newer options)."""
    shared = (a.options or {}).keys() & (b.options or {}).keys()
    return (a.name == b.name and a.dim == b.dim and a.weights_sha256 == b.weights_sha256
            and all(a.options[k] == b.options[k] for k in shared))


_OWN_FILES = {"library.sqlite", "library.sqlite-wal", "library.sqlite-shm", "lock", "cache"}


def _checked_store(store: str) -> str:
    if store not in ("faiss", "lance"):
        raise LibraryError(f"unknown store {store!r}", fix="use --store faiss or lance")
    if store == "lance":
        from atae.library.lance_vectors import require_lancedb

        require_lancedb()
    return store


class Library(VectorSpaceMixin, QueryMixin):
    """A sound library. Use ``Library.open``; thread-safe for searches (one internal lock)."""

    def __init__(self, root: Path, db: LibraryDB, *, audio_tower=None, text_tower=None, device: str = "cpu"):
        self.root = Path(root)
        self.db = db
        self.device = str(device)  # where its towers and model run (``atae.device``)
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
        self.store = s.get("store", "faiss")

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
        store: str | None = None,
        device: str = "auto",
    ) -> Library:
        """Open the library at ``path`` (``create=True`` makes it if missing).

        ``index``: auto, flat or hnsw (a FAISS store); ``store``: faiss (default) or lance (a LanceDB table,
        for tens of millions of segments); giving another store or index to an existing library rebuilds
        its vectors from SQLite. ``device``: where the towers and the model run (``atae.device``).

        ``model``: a trained model directory (or an ``AlignedModel``-like object): the library's vectors
        become its audio embeddings (re-embedded from the stored raw vectors if it changed).
        ``audio_encoder``/``audio_weights``/``audio_tower``: the tower for new libraries (default: the
        model's tower with the weights it was trained on, else ``best_audio_tower()``); an existing library
        must keep its tower.
        """
        from atae.device import resolve_device

        device = str(resolve_device(device))  # first: a missing device or store fails before any work
        if store is not None:
            _checked_store(store)
        root = Path(path).expanduser()
        exists = (root / "library.sqlite").exists()
        if not exists and not create:
            raise LibraryError("no library here", path=root, fix="create it with `atae index DIR --db LIB`")
        if root.exists() and not root.is_dir():
            raise LibraryError("this is a file, not a library folder", path=root,
                               fix="give --db a folder (new or made by `atae index`)")
        model_obj, model_dir = cls._resolve_model(model, device)  # a bad model creates nothing
        if create and not exists:
            if root.exists() and any(p.name not in _OWN_FILES for p in root.iterdir()):
                raise LibraryError("this folder exists and is not an atae library", path=root,
                                   fix="give --db a new or empty folder (the library is a folder of its own)")
            root.mkdir(parents=True, exist_ok=True)
        db = LibraryDB(root, create=create)
        try:
            lib = cls(root, db, audio_tower=audio_tower, text_tower=text_tower, device=device)
            if db.get_meta("audio_tower") is None:  # new (or never finished): fix its settings
                if not create:  # reading never sets a library up, so the unfinished command can finish it
                    raise unfinished(root)
                lib._init_settings(audio_encoder, audio_weights, model_obj, window_s, hop_s, long_s, index,
                                   store)
            else:
                lib._check_settings(audio_encoder, window_s, hop_s, long_s, index, store)
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
    def _resolve_model(model, device: str = "cpu"):
        if model is None:
            return None, None
        if isinstance(model, (str, Path)):
            from atae.model import AlignedModel

            d = Path(model).expanduser()
            if not d.is_dir():
                raise ModelError(
                    "model directory not found", path=d, fix="pass the --out folder of `atae train`"
                )
            return AlignedModel.load(d).to(device), str(d.resolve())
        return (model.to(device) if hasattr(model, "to") else model), None

    def _init_settings(self, audio_encoder, audio_weights, model, window_s, hop_s, long_s, index,
                       store) -> None:
        if self._audio_tower is None:
            from atae.towers.registry import best_audio_tower, get_audio_tower
            from atae.towers.trained_with import audio_tower_for

            name = audio_encoder or (model.audio_info.name if model is not None else None)
            if model is not None and name == model.audio_info.name:
                self._audio_tower = audio_tower_for(model.audio_info, explicit=audio_weights,
                                                    remembered=model.weights_files.get("audio"),
                                                    device=self.device)
            else:
                self._audio_tower = get_audio_tower(name or best_audio_tower(), weights=audio_weights,
                                                    device=self.device)
            audio_weights = getattr(self._audio_tower, "weights_path", None) or audio_weights
        info = self._audio_tower.info
        settings = {
            "long_s": long_s or _indexer.LONG_S,
            "window_s": window_s or _indexer.WINDOW_S,
            "hop_s": hop_s or _indexer.HOP_S,
            "index": index or "auto",
            "store": _checked_store(store or "faiss"),
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
        self.index_kind, self.store = settings["index"], settings["store"]

    def _check_settings(self, audio_encoder, window_s, hop_s, long_s, index, store) -> None:
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
        if (index is not None and index != self.index_kind) or (store is not None and store != self.store):
            if index is not None:
                choose_kind(index, 0)
            s["index"], s["store"] = index or self.index_kind, _checked_store(store or self.store)
            with self.db.transaction():
                self.db.set_meta("settings", s, as_json=True)
            self.index_kind, self.store = s["index"], s["store"]

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
            from atae.towers.trained_with import audio_tower_for

            self._audio_tower = audio_tower_for(self.stored_tower_info,
                                                remembered=self.db.get_meta("audio_weights") or None,
                                                device=self.device)
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

            m = AlignedModel.load(d).to(self.device)
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
            model, model_dir = self._resolve_model(model, self.device)
        if model is not None and not _same_tower(model.audio_info, self.stored_tower_info):
            raise ModelError(
                f"the model was trained on {model.audio_info.name} features ({model.audio_info.key()}) but "
                f"this library holds {self.stored_tower_info.name} features ({self.stored_tower_info.key()})",
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
        m = self.model
        if self._text_tower is None:
            if m is None:
                return None
            from atae.towers.trained_with import text_tower_for

            self._text_tower = text_tower_for(m.text_info, remembered=m.weights_files.get("text"),
                                              device=self.device)
        if m is not None and not _same_tower(self._text_tower.info, m.text_info):
            raise ModelError(
                f"the text tower {self._text_tower.info.name} ({self._text_tower.info.key()}) is not the one "
                f"the model was trained with ({m.text_info.key()})",
                path=self.model_dir,
                fix="install the model's text weights, or open the library without a text tower",
            )
        return self._text_tower

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
        engine: str = "local",
        ray_address: str | None = None,
        workers: int = 1,
    ) -> _indexer.IndexReport:
        """Index (or update) folders/files incrementally; see ``atae.library.indexer`` for the rules.
        Raises ``LibraryError`` if another process is indexing this library (``wait=True`` queues).
        ``engine="ray"``: the files are encoded on a Ray cluster (``atae.library.ray_index``: a local one,
        or ``ray_address``; ``workers`` tower actors); this process still decides and commits."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if engine == "ray":
            from atae.device import gpus_per_worker
            from atae.library.ray_index import RayEncoder

            encoder = RayEncoder(address=ray_address, workers=workers, num_gpus=gpus_per_worker(self.device))
        elif engine == "local":
            encoder = _indexer.encode_here
        else:
            raise LibraryError(f"unknown engine {engine!r}", fix="use --engine local or ray")
        with self._lock:
            with self._write(wait=wait):
                self._refresh(force=True)
                rep = _indexer.run_index(self, paths, exts=exts, progress=progress, batch_files=batch_files,
                                         encoder=encoder)
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
                "store": self.store,
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
