"""The library's metadata store: one SQLite file that is the single source of truth.

Everything that must survive a crash lives here, written in transactions (WAL journal): the files, their
segments (time spans), each segment's *raw* tower embedding (float32 BLOB) and, for towers with an
AudioSet head, its 527 tag probabilities (float16 BLOB). The FAISS index (``vectors.py``) is a derived
cache rebuilt from these rows, so a ``kill -9`` can at worst lose the batch in flight.

Tables
* ``meta(key, value)``: schema version, audio tower info (JSON), window policy, model dir + checksum,
  a ``generation`` counter bumped by every commit (readers use it to notice new data cheaply).
* ``files``: id, path (absolute, as found), size, mtime_ns, content hash (``content_hash``: sha256 of the
  whole file), duration, sample_rate, channels, encoder (tower key), model_version, status ('ok' |
  'failed'), error, indexed_at.
* ``segments``: id (= the vector id in FAISS), file_id, seg_index, start_s, end_s, n_elems, raw, tags.
  ``raw`` is the tower's whole sequence for the segment (n_elems x F float32, e.g. aiSFX's 2.3 s blocks),
  because a model's adapter is a per-element MLP followed by the mean: the mean must come after the
  adapter, so the elements are kept. ``tags`` is the element-mean of the tag probabilities.

Opening never writes to a file that is not an atae library: an existing ``library.sqlite`` whose tables
are not these is refused before anything (not even the journal mode) is changed. A transaction that
runs out of space raises ``DiskFullError`` (it is rolled back: the last commit is intact).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atae.errors import AtaeError, DiskFullError, LibraryError

SCHEMA_VERSION = 1
DB_NAME = "library.sqlite"
HASH_PREFIX = "sha256:"
_OWN_TABLES = {"meta", "files", "segments", "sqlite_sequence"}


def unfinished(root) -> LibraryError:
    """The error of a library whose `atae index` stopped before it was set up (reading never finishes it)."""
    return LibraryError("this library is unfinished: an `atae index` into it stopped before it was set up",
                        path=root,
                        fix="run the same `atae index DIR --db LIB` command again to finish setting it up")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT,
    duration REAL,
    sample_rate INTEGER,
    channels INTEGER,
    encoder TEXT,
    model_version TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    seg_index INTEGER NOT NULL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    n_elems INTEGER NOT NULL,
    raw BLOB NOT NULL,
    tags BLOB
);
CREATE INDEX IF NOT EXISTS segments_file ON segments(file_id);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
"""


def content_hash(path: str | Path) -> str:
    """``"sha256:<hex>"`` of the whole file. The indexer asks for it only when a file is new or its size
    or mtime changed, and trusts nothing less: a touched-but-identical file keeps its vectors, any edit
    (also one in the middle of a large file) is re-encoded, and a moved file is recognised. (Rows of
    older libraries hold a partial fingerprint without the prefix, which never matches: such a file is
    re-encoded once when it changes.) Raises OSError; a path that is not a regular file (a pipe put in
    place after the scan) raises instead of blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        return HASH_PREFIX + hashlib.file_digest(f, "sha256").hexdigest()


def is_missing(path: str) -> bool:
    """True only when ``path`` is known to be gone (ENOENT/ENOTDIR); a file that cannot be checked (a
    folder without permission, an I/O error) is not missing: nothing is removed on a guess."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):
        return False
    return False


def _is_read_only(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (8, 14) or "readonly" in str(exc) or "unable to open" in str(exc)  # READONLY, CANTOPEN


def _is_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # 13: SQLITE_FULL


@dataclass
class FileRow:
    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str | None
    duration: float | None
    sample_rate: int | None
    channels: int | None
    encoder: str | None
    model_version: str | None
    status: str
    error: str | None


@dataclass
class SegmentIn:
    """A segment to store: its span and the tower's raw vector (and tags)."""

    start_s: float
    end_s: float
    raw: np.ndarray  # (T, F) float32: the tower's sequence for this span
    tags: np.ndarray | None = None  # (527,) probabilities


class LibraryDB:
    """Thin typed wrapper over the SQLite file. Not thread-safe: one per thread (the server makes one
    per request thread via ``clone``)."""

    def __init__(self, root: Path, *, create: bool = False):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        if not self.path.exists() and not create:
            raise LibraryError(
                "no library here (library.sqlite is missing)",
                path=self.root,
                fix="create it with `atae index DIR --db LIB`",
            )
        if self.path.exists() and not self.path.is_file():
            raise LibraryError("library.sqlite is not a file", path=self.path,
                               fix="point --db at a folder made by `atae index`")
        try:
            version = self._connect(create)
        except sqlite3.DatabaseError as exc:
            if not create and _is_read_only(exc):
                version = self._connect_read_only(exc)
            else:
                raise self._error(exc, create) from exc
        if version is None:
            raise unfinished(self.root)
        if not str(version).isdigit():
            raise LibraryError(f"library schema version {version!r} is not one atae wrote", path=self.path,
                               fix="the file is damaged: restore it from a backup, or index into a new --db")
        if int(version) > SCHEMA_VERSION:
            raise LibraryError(
                f"library schema {version} is newer than this atae ({SCHEMA_VERSION})",
                path=self.path,
                fix="upgrade atae",
            )

    def _connect(self, create: bool) -> str | None:
        """Open the file (refusing a foreign one before changing anything), set it up when ``create``;
        returns the schema version."""
        self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None,
                                    check_same_thread=False)
        try:
            tables = self._tables()
            foreign = sorted(tables - _OWN_TABLES)
            if foreign or ("meta" in tables and self._columns("meta") != ["key", "value"]):
                raise LibraryError(
                    f"library.sqlite is not an atae library (it holds the tables "
                    f"{', '.join(foreign) or 'meta'})",
                    path=self.path,
                    fix="give --db a new or empty folder (the library is a folder of its own); "
                    "nothing in this file was changed",
                )
            if create and not tables:  # only takes effect on a new, empty file: 16 KiB pages hold
                self.conn.execute("PRAGMA page_size=16384")  # several 2 KB vectors
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable across process crashes
            self.conn.execute("PRAGMA foreign_keys=ON")
            if create and (self.get_meta("schema_version") is None or not self._has_index("files_hash")):
                # one transaction: a kill leaves no schema or all of it, with its version
                self.conn.executescript(
                    "BEGIN IMMEDIATE;" + _SCHEMA
                    + f"INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', '{SCHEMA_VERSION}');"
                    + "COMMIT;"
                )
            return self.get_meta("schema_version")
        except BaseException:
            self.conn.close()
            raise

    def _connect_read_only(self, first: sqlite3.DatabaseError) -> str | None:
        """A library on read-only storage: SQLite cannot make the WAL's shared-memory file there, so it is
        read through a read-only URI (immutable as a last resort: nobody can write to it either)."""
        from urllib.parse import quote

        for opts in ("mode=ro", "mode=ro&immutable=1"):
            try:
                self.conn = sqlite3.connect(f"file:{quote(str(self.path))}?{opts}", uri=True, timeout=60.0,
                                            isolation_level=None, check_same_thread=False)
                tables = self._tables()
                if tables - _OWN_TABLES:
                    raise self._error(first, False)
                return self.get_meta("schema_version")
            except sqlite3.DatabaseError:
                self.conn.close()
        raise self._error(first, False)

    def _error(self, exc: sqlite3.DatabaseError, create: bool) -> AtaeError:
        if _is_full(exc):
            return DiskFullError(self.path)
        if _is_read_only(exc):
            return LibraryError(f"cannot {'write to' if create else 'open'} the library ({exc})",
                                path=self.path,
                                fix="check the permissions of the library folder and its files")
        return LibraryError(f"library database is unreadable ({exc})", path=self.path,
                            fix="restore it from a backup or delete the folder and index again")

    def _tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _has_index(self, name: str) -> bool:
        q = "SELECT 1 FROM sqlite_master WHERE type='index' AND name=?"
        return self.conn.execute(q, (name,)).fetchone() is not None

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def clone(self) -> LibraryDB:
        return LibraryDB(self.root)

    def close(self) -> None:
        self.conn.close()

    # --- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return default
        return row[0] if row else default

    def get_meta_json(self, key: str):
        v = self.get_meta(key)
        try:
            return None if v is None else json.loads(v)
        except ValueError:
            raise LibraryError(f"the library's {key!r} record is corrupt", path=self.path,
                               fix="restore the library from a backup, or index into a new --db") from None

    def set_meta(self, key: str, value, *, as_json: bool = False) -> None:
        v = json.dumps(value, sort_keys=True) if as_json else str(value)
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, v),
        )

    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def transaction(self):
        return _Tx(self)

    # --- files ----------------------------------------------------------------------------------
    def files_under(self, root: str) -> dict[str, FileRow]:
        """Rows whose path lies under ``root`` (a directory) or equals it (a single file)."""
        root = root.rstrip(os.sep)
        pat = root.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + os.sep + "%"
        cur = self.conn.execute(
            f"SELECT {_FILE_COLS} FROM files WHERE path = ? OR path LIKE ? ESCAPE '\\'", (root, pat)
        )
        return {r[1]: FileRow(*r) for r in cur}

    def file(self, file_id: int) -> FileRow | None:
        r = self.conn.execute(f"SELECT {_FILE_COLS} FROM files WHERE id=?", (int(file_id),)).fetchone()
        return FileRow(*r) if r else None

    def failed_files(self) -> list[FileRow]:
        return [
            FileRow(*r)
            for r in self.conn.execute(f"SELECT {_FILE_COLS} FROM files WHERE status='failed' ORDER BY path")
        ]

    def counts(self) -> dict:
        files_ok = self.conn.execute("SELECT count(*) FROM files WHERE status='ok'").fetchone()[0]
        failed = self.conn.execute("SELECT count(*) FROM files WHERE status='failed'").fetchone()[0]
        dur = self.conn.execute(
            "SELECT coalesce(sum(duration), 0) FROM files WHERE status='ok'").fetchone()[0]
        return {"files": files_ok, "failed": failed, "segments": self.segment_count(), "hours": dur / 3600.0}

    def put_file(
        self,
        *,
        path: str,
        size: int,
        mtime_ns: int,
        hash: str | None,
        duration: float | None,
        sample_rate: int | None,
        channels: int | None,
        encoder: str | None,
        model_version: str | None,
        status: str,
        error: str | None,
        segments: list[SegmentIn] = (),
    ) -> int:
        """Insert or replace one file and its segments (call inside a transaction). Replacing deletes
        the old segments, so their vector ids disappear and new ones are allocated."""
        self.conn.execute("DELETE FROM files WHERE path=?", (path,))
        cur = self.conn.execute(
            "INSERT INTO files(path, size, mtime_ns, hash, duration, sample_rate, channels, encoder, "
            "model_version, status, error, indexed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                path,
                size,
                mtime_ns,
                hash,
                duration,
                sample_rate,
                channels,
                encoder,
                model_version,
                status,
                error,
                time.time(),
            ),
        )
        fid = cur.lastrowid
        self.conn.executemany(
            "INSERT INTO segments(file_id, seg_index, start_s, end_s, n_elems, raw, tags) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (
                    fid,
                    i,
                    float(s.start_s),
                    float(s.end_s),
                    int(np.asarray(s.raw).reshape(-1, np.asarray(s.raw).shape[-1]).shape[0]),
                    _blob(s.raw, np.float32),
                    None if s.tags is None else _blob(s.tags, np.float16),
                )
                for i, s in enumerate(segments)
            ],
        )
        return fid

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.conn.execute("UPDATE files SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, file_id))

    def move_file(self, file_id: int, new_path: str, size: int, mtime_ns: int) -> None:
        self.conn.execute("DELETE FROM files WHERE path=?", (new_path,))
        self.conn.execute(
            "UPDATE files SET path=?, size=?, mtime_ns=? WHERE id=?", (new_path, size, mtime_ns, file_id)
        )

    def delete_files(self, ids: list[int]) -> None:
        self.conn.executemany("DELETE FROM files WHERE id=?", [(int(i),) for i in ids])

    def files_with_hash(self, hashes) -> dict[str, list[FileRow]]:
        """Indexed ('ok') rows by content hash, for the given hashes (move detection across folders)."""
        out: dict[str, list[FileRow]] = {}
        hashes = [h for h in dict.fromkeys(hashes) if h]
        sql = f"SELECT {_FILE_COLS} FROM files WHERE status='ok' AND hash IN ({{q}}) ORDER BY id"
        for rows in self._in(sql, hashes):
            for r in rows:
                out.setdefault(r[4], []).append(FileRow(*r))
        return out

    def all_paths(self) -> list[tuple[int, str]]:
        """(id, path) of every file row, indexed or failed."""
        return list(self.conn.execute("SELECT id, path FROM files ORDER BY path"))

    def set_model_version(self, version: str | None) -> None:
        self.conn.execute("UPDATE files SET model_version=? WHERE status='ok'", (version,))

    # --- segments -------------------------------------------------------------------------------
    def segment_ids(self) -> np.ndarray:
        return np.fromiter(
            (r[0] for r in self.conn.execute("SELECT id FROM segments ORDER BY id")), dtype=np.int64
        )

    def iter_raw(self, ids: np.ndarray | None = None, batch: int = 1024):
        """Yield (ids (n,), [ (T_i, F) float32 sequences ]) in id order: all segments or the given ids."""

        def pack(rows):
            return (
                np.array([r[0] for r in rows], dtype=np.int64),
                [np.frombuffer(r[2], dtype=np.float32).reshape(r[1], -1) for r in rows],
            )

        if ids is None:
            cur = self.conn.execute("SELECT id, n_elems, raw FROM segments ORDER BY id")
            while rows := cur.fetchmany(batch):
                yield pack(rows)
            return
        for rows in self._in("SELECT id, n_elems, raw FROM segments WHERE id IN ({q}) ORDER BY id",
                             (int(x) for x in ids)):
            if rows:
                yield pack(rows)

    def segment_ids_of(self, file_ids) -> np.ndarray:
        """Sorted ids of the segments of the given files."""
        out = [r[0] for rows in self._in("SELECT id FROM segments WHERE file_id IN ({q})",
                                         (int(x) for x in file_ids)) for r in rows]
        return np.array(sorted(out), dtype=np.int64)

    def segment_ids_after(self, last_id: int) -> np.ndarray:
        """Ids of the segments committed after ``last_id`` (ids only grow), in order."""
        rows = self.conn.execute("SELECT id FROM segments WHERE id > ? ORDER BY id", (int(last_id),))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def segment_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM segments").fetchone()[0])

    def has_segments(self) -> bool:
        return self.conn.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is not None

    def has_tags(self) -> bool:
        """True when some segment has AudioSet tags (its tower has an AudioSet head)."""
        row = self.conn.execute("SELECT 1 FROM segments WHERE tags IS NOT NULL LIMIT 1").fetchone()
        return row is not None

    def count_untagged(self) -> int:
        """Segments without tags (indexed by a tower without an AudioSet head, or by an old atae)."""
        return int(self.conn.execute("SELECT count(*) FROM segments WHERE tags IS NULL").fetchone()[0])

    def tags_matrix(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(segment ids, (n, 527) float32 tag probabilities) for the zero-shot scorers; None if no tags."""
        rows = self.conn.execute(
            "SELECT id, tags FROM segments WHERE tags IS NOT NULL ORDER BY id"
        ).fetchall()
        if not rows:
            return np.zeros(0, dtype=np.int64), None
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            np.stack([np.frombuffer(r[1], dtype=np.float16) for r in rows]).astype(np.float32),
        )

    def segment_rows(self, ids: list[int]) -> dict[int, tuple]:
        """id -> (file_id, path, duration, start_s, end_s) for live ids (missing ids are left out)."""
        sql = ("SELECT s.id, s.file_id, f.path, f.duration, s.start_s, s.end_s FROM segments s "
               "JOIN files f ON f.id = s.file_id WHERE s.id IN ({q})")
        return {r[0]: r[1:] for rows in self._in(sql, (int(x) for x in ids)) for r in rows}

    # --- result details: explanations and "more like this" ----------------------------------------
    def segment_tags(self, ids) -> dict[int, np.ndarray]:
        """id -> (527,) float32 tag probabilities, for the given segments that have tags."""
        return {int(sid): np.frombuffer(blob, dtype=np.float16).astype(np.float32)
                for rows in self._in("SELECT id, tags FROM segments WHERE tags IS NOT NULL AND id IN ({q})",
                                     (int(x) for x in ids))
                for sid, blob in rows}

    def _in(self, sql: str, values) -> Iterator[list[tuple]]:
        """The rows of ``sql``, whose ``{q}`` stands for an IN list, over ``values`` in chunks of 500 (SQLite
        caps a statement's variables), one list of rows per chunk."""
        values = list(values)
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            yield self.conn.execute(sql.replace("{q}", ",".join("?" * len(chunk))), chunk).fetchall()

    def file_by_path(self, path: str) -> FileRow | None:
        r = self.conn.execute(f"SELECT {_FILE_COLS} FROM files WHERE path=?", (str(path),)).fetchone()
        return FileRow(*r) if r else None

    def file_segments(self, file_id: int) -> list[tuple[int, float, float]]:
        """(segment id, start_s, end_s) of one file's segments, in time order."""
        return [
            (int(a), float(b), float(c))
            for a, b, c in self.conn.execute(
                "SELECT id, start_s, end_s FROM segments WHERE file_id=? ORDER BY seg_index", (int(file_id),)
            )
        ]


_FILE_COLS = (
    "id, path, size, mtime_ns, hash, duration, sample_rate, channels, encoder, model_version, status, error"
)


def _blob(a: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(a, dtype=dtype).reshape(-1)).tobytes()


class _Tx:
    """``with db.transaction():`` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), bumping ``generation``."""

    def __init__(self, db: LibraryDB):
        self.db = db

    def __enter__(self):
        self.db.conn.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.db.set_meta("generation", self.db.generation() + 1)
                self.db.conn.execute("COMMIT")
                return False
            except sqlite3.Error as e:
                exc = e
        self._rollback()
        if isinstance(exc, sqlite3.Error) and _is_full(exc):
            raise DiskFullError(self.db.path) from exc
        if exc_type is None:
            raise exc
        return False

    def _rollback(self) -> None:
        try:
            self.db.conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite already rolled back (it does on SQLITE_FULL)
            pass
