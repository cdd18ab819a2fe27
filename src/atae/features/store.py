"""The feature store: every frozen tower runs once per dataset; training reads cached sequences.

Layout (one folder per tower identity, so numbers from different towers can never mix)::

    FEATS/audio/<TowerInfo.key()>/manifest.json        tower identity, atae version, created, counts
                                  shard-00000.npy       (sum T, F) float32 rows of many sequences
                                  shard-00000.times.npy (sum T, 2) float64 [start, end) s (audio only)
                                  shard-00000.tags.npy  (sum T, 527) float32 (towers with a tag head)
                                  shard-00000.json      index: keys, row offsets, idents, deleted keys
                                                        <- the commit point
                                  failed.json           key -> {path, reason} of the last failures
    FEATS/text/<TowerInfo.key()>/...                    same, keys "<clip key>#<caption index>"

Why this shape:

* **Append-only shards, one per extraction batch.** A batch's arrays are written first (temp file in
  the same folder, fsync, ``os.replace``), its index JSON last. A shard without its index is invisible,
  so an interruption (Ctrl-C, ``kill -9``, power loss) loses at most the batch in flight and the next
  run re-extracts exactly the keys that no committed index lists. Nothing is ever rewritten in place.
* **Memory-mapped reads.** ``SequenceTable`` opens every shard with ``np.load(mmap_mode="r")``, so a
  training run touches only the rows it batches and several processes share the page cache.
* **Compaction.** Many small shards cost file handles; after a run the small ones are merged into
  larger ones (new shard committed first, old indexes removed after), which keeps the crash guarantee.
* **Refuse to mix.** ``manifest.json`` stores the full ``TowerInfo``; opening a folder whose manifest
  disagrees with the tower raises ``DataError`` instead of returning someone else's numbers.
* **Failures are data, not crashes.** An unreadable file or an empty caption is listed in the report
  and in ``failed.json`` (so later runs keep reporting it), and retried on the next run.
* **One writer per folder.** Extraction holds an ``fcntl`` lock on ``.lock``; a second concurrent
  writer gets a clear error (the OS drops the lock if the process dies).
* **Rows know what they were computed from.** Each index lists, per key, an ``ident``: ``"sha1:<hex>"``
  of the caption's UTF-8 text, or ``{"path", "size", "mtime_ns"}`` of the audio file (a ``stat``, no
  hashing). Extraction re-encodes a cached key whose text or file changed instead of silently reusing
  the old numbers (two datasets sharing clip keys, regenerated captions, a rewritten file). Shards
  written before format 2 carry no idents: their captions are re-encoded once (cheap); their audio is
  trusted unless the file was modified after the shard was committed (re-encoding audio costs hours).
* **Last committed shard wins.** A re-extracted key is appended to a newer shard; readers serve the
  row of the highest-numbered committed shard that lists it, and an index's ``deleted`` list drops a
  key (a changed item that now fails must not keep its stale row). Compaction copies only the winning
  rows, so superseded ones disappear when their shard is merged (small shards, or any shard with more
  dead rows than live ones).

The manifest's ``counts`` are informational (updated after each run); the shard indexes are the truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from atae.errors import DataError
from atae.io import TEMP_MARK, atomic_open
from atae.towers.base import TowerInfo

FORMAT_VERSION = 2  # 2: per-key idents, ``deleted`` lists, last shard wins (1 is read and upgraded)
_READABLE_FORMATS = (1, 2)
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.json$")
_ANY_SHARD_RE = re.compile(r"^shard-(\d{5,})\.")
COMPACT_TARGET_BYTES = 256 << 20  # merged shard size; small enough to copy quickly


# --------------------------------------------------------------------------------------------- io


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write via ``write(fileobj)`` atomically (``atae.io``: temp file next to ``path``, fsync, rename)."""
    with atomic_open(path, "wb") as f:
        write(f)


def _atomic_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


# ------------------------------------------------------------------------------------------ table


@dataclass
class _Shard:
    num: int
    keys: list[str]
    offsets: np.ndarray  # (n+1,) int64 row offsets
    data: np.ndarray  # memmap (rows, F)
    times: np.ndarray | None
    tags: np.ndarray | None
    nbytes: int
    idents: list  # per key: what the row was computed from (None: unknown, written before format 2)
    deleted: list[str]  # keys this commit drops (their older rows stop being served)
    created: float  # commit time (seconds since the epoch)


class SequenceTable:
    """All cached sequences of one tower: key -> (T, F) rows, plus times/tags when the tower has them.

    Reading is cheap and lock-free; writing (``append``) is done by the ``extract_*`` functions.
    """

    def __init__(self, folder: str | Path, info: TowerInfo, *, create: bool = True):
        self.folder = Path(folder)
        self.info = info
        self.problems: list[str] = []  # shards ignored because they are damaged
        self._format = None  # of manifest.json; writing upgrades it to FORMAT_VERSION
        self._damaged: list[int] = []
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            self._check_manifest(manifest)
        elif create:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_manifest(counts={"keys": 0, "rows": 0, "shards": 0, "failed": 0})
            self._format = FORMAT_VERSION
        elif not self.folder.exists():
            raise DataError("no cached features for this tower", path=self.folder,
                            fix="run `atae extract` (or training, which extracts) first")
        self.refresh()

    # ---- manifest
    def _write_manifest(self, counts: dict) -> None:
        from atae import __version__

        old = {}
        path = self.folder / "manifest.json"
        if path.exists():
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(path.read_text())
        now = datetime.now(UTC).isoformat(timespec="seconds")
        _atomic_json(path, {
            "format": FORMAT_VERSION,
            "tower": self.info.to_dict(),
            "encoder": self.info.name,
            "weights_sha256": self.info.weights_sha256,
            "sample_rate": self.info.sample_rate,
            "options": self.info.options,
            "dim": self.info.dim,
            "dtype": "float32",
            "created": old.get("created", now),
            "updated": now,
            "atae_version": __version__,
            "counts": counts,
        })

    def _check_manifest(self, path: Path) -> None:
        try:
            m = json.loads(path.read_text())
            stored = m["tower"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"unreadable feature-store manifest ({e})", path=path,
                            fix="delete this folder; its features will be extracted again") from e
        self._format = m.get("format")
        if self._format not in _READABLE_FORMATS:
            raise DataError(f"feature-store format {m.get('format')} (this atae reads {FORMAT_VERSION})",
                            path=path, fix="delete this folder to re-extract with this version")
        want = self.info.to_dict()
        if json.dumps(stored, sort_keys=True) != json.dumps(want, sort_keys=True):
            diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
            raise DataError(
                f"cached features were made by a different tower (differs in {', '.join(diff)}: "
                f"cached {[stored.get(k) for k in diff]}, requested {[want.get(k) for k in diff]}); "
                "refusing to mix them", path=path,
                fix="use another --out folder, or delete this one to re-extract")

    # ---- reading
    def refresh(self) -> None:
        """(Re)load the committed shard indexes and ``failed.json``."""
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # key -> (shard position, start, end)
        self._ident: dict[str, object] = {}  # key -> ident of its served row
        self.problems = []
        self._damaged = []
        nums = sorted(int(m.group(1)) for p in self.folder.glob("shard-*.json")
                      if (m := _SHARD_RE.match(p.name)))
        for num in nums:
            shard = self._open_shard(num)
            if shard is None:
                continue
            self._add_shard(shard)
        self.failed: dict[str, str] = {}
        self._failed_paths: dict[str, str] = {}
        fpath = self.folder / "failed.json"
        if fpath.exists():
            try:
                raw = json.loads(fpath.read_text())
                self.failed = {k: v["reason"] for k, v in raw.items()}
                self._failed_paths = {k: v.get("path", k) for k, v in raw.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.problems.append(f"{fpath}: unreadable, ignored")

    def _add_shard(self, shard: _Shard) -> None:
        """Serve ``shard``'s keys: shards are added in commit order, so the last one listing a key wins."""
        pos = len(self._shards)
        self._shards.append(shard)
        for k in shard.deleted:
            self._where.pop(k, None)
            self._ident.pop(k, None)
        for i, k in enumerate(shard.keys):
            self._where[k] = (pos, int(shard.offsets[i]), int(shard.offsets[i + 1]))
            self._ident[k] = shard.idents[i]

    def _open_shard(self, num: int) -> _Shard | None:
        base = self.folder / f"shard-{num:05d}"
        try:
            idx = json.loads(base.with_suffix(".json").read_text())
            keys = list(idx["keys"])
            idents = list(idx.get("ident") or [None] * len(keys))
            deleted = [str(k) for k in idx.get("deleted", [])]
            if idx["rows"] == 0:  # a commit that only deletes keys: it has no arrays
                data = np.zeros((0, self.info.dim), np.float32)
            else:
                data = np.load(base.with_suffix(".npy"), mmap_mode="r")
            offsets = np.asarray(idx["offsets"], dtype=np.int64)
            ok = (len(idents) == len(keys) and data.ndim == 2
                  and data.shape == (idx["rows"], self.info.dim) and data.dtype == np.float32
                  and len(offsets) == len(keys) + 1 and offsets[0] == 0 and offsets[-1] == data.shape[0]
                  and bool(np.all(np.diff(offsets) > 0)))
            times = tags = None
            if ok and idx.get("has_times") and idx["rows"]:
                times = np.load(Path(f"{base}.times.npy"), mmap_mode="r")
                ok = times.shape == (data.shape[0], 2)
            if ok and idx.get("has_tags") and idx["rows"]:
                tags = np.load(Path(f"{base}.tags.npy"), mmap_mode="r")
                ok = tags.ndim == 2 and tags.shape[0] == data.shape[0]
            if not ok:
                raise ValueError("arrays do not match the index")
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = f"{base}.json: damaged shard ignored ({e}); its keys will be extracted again"
            self.problems.append(msg)
            self._damaged.append(num)
            warnings.warn(msg, stacklevel=3)
            return None
        return _Shard(num, keys, offsets, data, times, tags, int(data.nbytes), idents, deleted,
                      float(idx.get("created", 0.0)))

    @property
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _locate(self, key: str) -> tuple[_Shard, int, int]:
        try:
            pos, a, b = self._where[key]
        except KeyError:
            reason = self.failed.get(key)
            extra = f" (extraction failed: {reason})" if reason else ""
            raise KeyError(f"{key!r} is not in the feature store {self.folder}{extra}") from None
        return self._shards[pos], a, b

    def get(self, key: str) -> np.ndarray:
        """(T, F) float32, a read-only view of the memory map."""
        s, a, b = self._locate(key)
        return s.data[a:b]

    def times(self, key: str) -> np.ndarray | None:
        """(T, 2) [start, end) seconds of each element, or None (text tables)."""
        s, a, b = self._locate(key)
        return None if s.times is None else s.times[a:b]

    def tags(self, key: str) -> np.ndarray | None:
        """(T, 527) AudioSet probabilities, or None when the tower has no tag head."""
        s, a, b = self._locate(key)
        return None if s.tags is None else s.tags[a:b]

    def ident(self, key: str) -> object | None:
        """What ``key``'s row was computed from (see ``text_ident``/``audio_ident``); None: not recorded."""
        self._locate(key)
        return self._ident.get(key)

    def committed_at(self, key: str) -> float:
        """When ``key``'s row was committed (seconds since the epoch; 0 when unknown)."""
        return self._locate(key)[0].created

    def length(self, key: str) -> int:
        _, a, b = self._locate(key)
        return b - a

    def batch(self, keys: Sequence[str]):
        """Zero-padded ``(Z (B, Tmax, F) float32 tensor, mask (B, Tmax) bool tensor, True = real)``."""
        import torch

        locs = [self._locate(k) for k in keys]
        tmax = max((b - a for _, a, b in locs), default=0)
        z = np.zeros((len(locs), tmax, self.info.dim), dtype=np.float32)
        mask = np.zeros((len(locs), tmax), dtype=bool)
        for i, (s, a, b) in enumerate(locs):
            z[i, : b - a] = s.data[a:b]
            mask[i, : b - a] = True
        return torch.from_numpy(z), torch.from_numpy(mask)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def n_rows(self) -> int:
        """Rows served (superseded rows still on disk until compaction are not counted)."""
        return sum(b - a for _, a, b in self._where.values())

    # ---- writing (callers hold the lock; see ``writer``)
    @contextlib.contextmanager
    def writer(self):
        """Exclusive write access for one process; cleans temp files and index-less shard data."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = open(self.folder / ".lock", "a+")  # held for the whole block
        try:
            try:
                import fcntl

                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
                pass
            except OSError as e:
                raise DataError("another process is writing these features", path=self.folder,
                                fix="wait for the other `atae extract`/training to finish") from e
            self._cleanup()
            self.refresh()
            if self._damaged:
                self._quarantine()
            if self._format != FORMAT_VERSION:  # before the first new shard: older atae then refuses
                self._write_manifest(counts=self._counts())
                self._format = FORMAT_VERSION
            yield self
        finally:
            lock.close()

    def _cleanup(self) -> None:
        committed = {int(m.group(1)) for p in self.folder.glob("shard-*.json")
                     if (m := _SHARD_RE.match(p.name))}
        for p in self.folder.iterdir():
            if p.name.startswith(".") and TEMP_MARK in p.name:
                p.unlink(missing_ok=True)
            elif (m := _ANY_SHARD_RE.match(p.name)) and int(m.group(1)) not in committed:
                p.unlink(missing_ok=True)  # data of a batch whose index never landed

    def _quarantine(self) -> None:
        """Move damaged shards to ``damaged/`` (kept for inspection, never read); keys get re-extracted."""
        dest = self.folder / "damaged"
        dest.mkdir(exist_ok=True)
        for num in self._damaged:
            index = self.folder / f"shard-{num:05d}.json"
            if index.exists():
                os.replace(index, dest / index.name)  # index first: the shard stops being committed
            for p in self.folder.glob(f"shard-{num:05d}.*"):
                os.replace(p, dest / p.name)
        _fsync_dir(self.folder)
        self._damaged = []

    def _next_num(self) -> int:
        files = list(self.folder.iterdir())
        if (self.folder / "damaged").is_dir():
            files += list((self.folder / "damaged").iterdir())  # never reuse a quarantined number
        nums = [int(m.group(1)) for p in files if (m := _ANY_SHARD_RE.match(p.name))]
        return max(nums, default=-1) + 1

    def append(self, keys: list[str], seqs: list[np.ndarray], times: list[np.ndarray] | None = None,
               tags: list[np.ndarray] | None = None, *, idents: Sequence | None = None,
               deleted: Iterable[str] = ()) -> None:
        """Commit one shard: data files first, index last (the commit point).

        A key already stored is superseded (the new shard wins); ``idents`` (one per key, JSON values)
        record what each row was computed from; ``deleted`` keys stop being served.
        """
        deleted = sorted(set(deleted) - set(keys))
        if not keys and not deleted:
            return
        if len(set(keys)) != len(keys):
            raise ValueError("append: duplicate keys")
        idents = [None] * len(keys) if idents is None else list(idents)
        if len(idents) != len(keys):
            raise ValueError("append: one ident per key")
        lens = [int(s.shape[0]) for s in seqs]
        if len(seqs) != len(keys) or any(n < 1 for n in lens) \
                or any(s.ndim != 2 or s.shape[1] != self.info.dim for s in seqs):
            raise ValueError(f"append: one sequence per key, each (T>=1, {self.info.dim})")
        num = self._next_num()
        base = self.folder / f"shard-{num:05d}"
        rows = sum(lens)
        if keys:
            data = np.ascontiguousarray(np.concatenate(seqs, axis=0), dtype=np.float32)
            _atomic_npy(base.with_suffix(".npy"), data)
            if times is not None:
                _atomic_npy(Path(f"{base}.times.npy"), np.concatenate(times, axis=0).astype(np.float64))
            if tags is not None:
                _atomic_npy(Path(f"{base}.tags.npy"), np.concatenate(tags, axis=0).astype(np.float32))
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tolist()
        _atomic_json(base.with_suffix(".json"), {
            "format": FORMAT_VERSION, "keys": list(keys), "offsets": offsets, "rows": int(rows),
            "dim": self.info.dim, "dtype": "float32", "has_times": times is not None and bool(keys),
            "has_tags": tags is not None and bool(keys), "created": time.time(), "ident": idents,
            "deleted": deleted,
        })
        _fsync_dir(self.folder)
        shard = self._open_shard(num)
        if shard is None:  # pragma: no cover - we just wrote it
            raise DataError("shard could not be read back after writing", path=base.with_suffix(".json"))
        self._add_shard(shard)

    def set_failures(self, new: dict[str, tuple[str, str]], succeeded: Iterable[str] = ()) -> None:
        """Record ``key -> (path, reason)`` failures; drop keys that now succeeded."""
        succeeded = set(succeeded)
        merged = {k: {"path": self._failed_paths.get(k, k), "reason": r} for k, r in self.failed.items()
                  if k not in succeeded and k not in self._where}
        merged.update({k: {"path": p, "reason": r} for k, (p, r) in new.items()})
        if merged == {k: {"path": self._failed_paths.get(k, k), "reason": r} for k, r in self.failed.items()}:
            return
        _atomic_json(self.folder / "failed.json", merged)
        self.failed = {k: v["reason"] for k, v in merged.items()}
        self._failed_paths = {k: v["path"] for k, v in merged.items()}

    def _counts(self) -> dict:
        return {"keys": len(self), "rows": self.n_rows, "shards": self.n_shards, "failed": len(self.failed)}

    def update_manifest(self) -> None:
        counts = self._counts()
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((self.folder / "manifest.json").read_text())["counts"] == counts:
                return  # a run that changed nothing writes nothing
        self._write_manifest(counts=counts)

    def compact(self, target_bytes: int = COMPACT_TARGET_BYTES, min_small: int = 4) -> int:
        """Merge small shards into shards of up to ``target_bytes``; returns how many were merged away.

        Only shards whose served rows take under ``target_bytes / 8`` count as small, and nothing
        happens below ``min_small`` of them, so an incremental run adding a batch or two never rewrites
        much data. A shard holding superseded rows is rewritten when it is small (even alone) or more
        than half of its rows are dead: the new shard holds only the rows readers are served
        (plus the deletions still needed to hide older rows elsewhere). Crash-safe: the merged shard is
        committed before the old indexes and data are removed; it is the newest, so a reader that sees
        both gets identical numbers from it.
        """
        live = [0] * len(self._shards)
        for pos, a, b in self._where.values():
            live[pos] += b - a

        def live_bytes(p: int) -> int:
            total = int(self._shards[p].offsets[-1])
            return self._shards[p].nbytes * live[p] // total if total else 0

        def garbage(p: int) -> bool:  # dead rows (deletions alone do not count: they may still be needed)
            return live[p] < int(self._shards[p].offsets[-1])

        cand = [p for p in range(len(self._shards))
                if live_bytes(p) < target_bytes // 8 or 2 * live[p] < int(self._shards[p].offsets[-1])]
        if len(cand) < max(2, min_small) and not any(garbage(p) for p in cand):
            return 0
        groups, cur, size = [], [], 0
        for p in cand:
            if cur and size + live_bytes(p) > target_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += live_bytes(p)
        groups.append(cur)
        before, removed = len(self._shards), set()
        for g in (g for g in groups if len(g) >= 2 or (g and garbage(g[0]))):
            shards = [self._shards[p] for p in g]
            has_times = all(self._shards[p].times is not None for p in g if live[p])
            has_tags = all(self._shards[p].tags is not None for p in g if live[p])
            if any((s.times is not None) != has_times or (s.tags is not None) != has_tags
                   for p, s in zip(g, shards, strict=True) if live[p]):
                continue  # inconsistent shards: leave them alone
            keys, seqs, times, tags, idents = [], [], [], [], []
            for p, s in zip(g, shards, strict=True):
                for i, k in enumerate(s.keys):
                    if self._where.get(k, (-1,))[0] != p:
                        continue  # superseded or deleted: readers never see this row
                    a, b = int(s.offsets[i]), int(s.offsets[i + 1])
                    keys.append(k)
                    seqs.append(np.asarray(s.data[a:b]))
                    idents.append(self._ident.get(k))
                    if has_times:
                        times.append(np.asarray(s.times[a:b]))
                    if has_tags:
                        tags.append(np.asarray(s.tags[a:b]))
            dropped = {k for s in shards for k in s.deleted if k not in self._where}
            gone = removed | set(g)
            if dropped:  # keep a deletion only while an older row of that key survives elsewhere
                dropped &= {k for p, s in enumerate(self._shards) if p not in gone for k in s.keys}
            for k in keys:
                del self._where[k]
            self.append(keys, seqs, times if has_times and keys else None,
                        tags if has_tags and keys else None, idents=idents, deleted=dropped)
            for s in shards:
                (self.folder / f"shard-{s.num:05d}.json").unlink(missing_ok=True)
            _fsync_dir(self.folder)
            for s in shards:
                base = self.folder / f"shard-{s.num:05d}"
                for suffix in (".npy", ".times.npy", ".tags.npy"):
                    Path(f"{base}{suffix}").unlink(missing_ok=True)
            removed |= set(g)
        if not removed:
            return 0
        self.refresh()
        return before - len(self._shards)


class FeatureStore:
    """A folder of per-tower ``SequenceTable``s (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def table(self, info: TowerInfo, *, create: bool = True) -> SequenceTable:
        if info.kind not in ("audio", "text"):
            raise ValueError(f"tower kind must be audio or text, not {info.kind!r}")
        return SequenceTable(self.root / info.kind / info.key(), info, create=create)

    def audio_table(self, info: TowerInfo, *, create: bool = True) -> SequenceTable:
        if info.kind != "audio":
            raise ValueError(f"{info.name} is a {info.kind} tower")
        return self.table(info, create=create)

    def text_table(self, info: TowerInfo, *, create: bool = True) -> SequenceTable:
        if info.kind != "text":
            raise ValueError(f"{info.name} is a {info.kind} tower")
        return self.table(info, create=create)


def caption_key(clip_key: str, i: int) -> str:
    """Text-store key of caption ``i`` (0-based, CSV order) of a clip."""
    return f"{clip_key}#{i}"
