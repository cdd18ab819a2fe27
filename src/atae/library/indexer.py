"""Incremental, resumable, crash-safe indexing of folders into a library.

Windowing policy (why: a model is trained on whole 15-30 s clips, and a search must still find a
3-second event in a 10-minute recording and say where it is):

* a file of at most ``long_s`` = 30 s is **one segment**: the tower's whole-clip embedding, span
  0..duration (the same representation the model was trained on);
* a longer file is cut into **windows of ``window_s`` = 10 s every ``hop_s`` = 5 s** (the last window
  aligned to the end, ``atae.towers.base.window_spans``), each encoded on its own as a whole clip, so any
  event up to 5 s long lies entirely inside at least one window and fills >= 30 % of it; the result
  reports the best window's span. Long files are decoded in pages of ``PAGE_S`` so memory stays small.
  The tower's whole sequence for each segment is stored (see ``db.py``); tags are element-averaged.

Incremental rules (per file, by absolute path): unknown -> *new*; same size and mtime -> *unchanged*;
size/mtime differ but the same ``content_hash`` (sha256 of the whole file, never a partial one) ->
*unchanged* (only the stat is updated); a new path whose hash equals that of an indexed file that is no
longer on disk -> *moved* (row re-pointed, nothing re-encoded), whether the old path lay under the
folders being indexed or anywhere else (a renamed folder indexed under its new name); otherwise ->
*changed* (re-encoded); in the library under an indexed root but no longer on disk -> *removed* (except
under a folder that could not be read this run: its files are kept). Files under folders that are gone
and were not named are left alone and counted in ``missing_elsewhere`` (``Library.prune`` / ``atae
prune`` removes them). A file that failed before is retried only when it changes. Files are committed in
batches, one SQLite transaction each, so an interrupted run keeps every finished batch and the next run
does only what is left.

A file whose header is refused by ``atae.audio.check_header`` (an implausible sample rate, a declared
length over 3 h) fails before any window is planned or decoded.

A file that changes or disappears while it is being encoded is not stored (its stat is compared before
and after); it is reported and picked up by the next run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from atae.errors import AtaeError, AudioError
from atae.library.db import SegmentIn, content_hash, is_missing
from atae.library.scan import Found, scan, under

LONG_S = 30.0
WINDOW_S = 10.0
HOP_S = 5.0
PAGE_S = 300.0
BATCH_FILES = 16
BATCH_SECONDS = 10.0  # commit at least this often (wall clock), so a crash loses little work
SAVE_SECONDS = 60.0  # write the FAISS file at most this often during a run (and at the end)


@dataclass
class IndexReport:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # changed/vanished during the run
    previously_failed: int = 0  # unchanged files that failed before (not retried)
    not_scanned: list[tuple[str, str]] = field(default_factory=list)  # unreadable folders, bad names
    missing_elsewhere: int = 0  # indexed files under other folders that no longer exist
    missing_example: str = ""
    segments_added: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "removed": self.removed,
            "failed": [list(x) for x in self.failed],
            "skipped": [list(x) for x in self.skipped],
            "previously_failed": self.previously_failed,
            "not_scanned": [list(x) for x in self.not_scanned],
            "missing_elsewhere": self.missing_elsewhere,
            "segments_added": self.segments_added,
            "audio_seconds": round(self.audio_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
        }

    def summary(self) -> str:
        s = (
            f"new {self.new}, changed {self.changed}, unchanged {self.unchanged}, moved {self.moved}, "
            f"removed {self.removed}, failed {len(self.failed)}"
        )
        if self.skipped:
            s += f", skipped {len(self.skipped)} (changed while indexing; next run retries)"
        if self.not_scanned:
            s += f", not looked at {len(self.not_scanned)} (listed below)"
        if self.audio_seconds:
            s += (
                f"; {self.audio_seconds / 60:.1f} min of audio in {self.wall_seconds:.1f} s "
                f"({self.realtime_factor:.0f}x real time)"
            )
        return s


def segment_plan(
    duration: float, *, long_s: float, window_s: float, hop_s: float
) -> list[tuple[float, float]]:
    """The spans (seconds) a file of ``duration`` is indexed as (see the module docstring)."""
    from atae.towers.base import window_spans

    if duration <= long_s:
        return [(0.0, duration)]
    ms = 1000  # plan in milliseconds, independent of the tower's sample rate
    return [(a / ms, b / ms) for a, b in window_spans(int(round(duration * ms)), ms, window_s, hop_s)]


def encode_file(tower, path: str, *, long_s: float, window_s: float, hop_s: float):
    """(duration, sample_rate, channels, [SegmentIn]) for one file; raises AudioError if unreadable."""
    from atae.audio import load_audio, probe

    info = probe(path)  # its header check refuses files without frames
    spans = segment_plan(info.duration, long_s=long_s, window_s=window_s, hop_s=hop_s)
    sr = tower.sample_rate
    segs: list[SegmentIn] = []
    if len(spans) == 1:
        wave = load_audio(path, sr)
        segs.append(_segment(tower.encode(wave), 0.0, info.duration))
        return info.duration, info.sample_rate, info.channels, segs
    # group windows into pages so a long file is decoded page by page, not all at once
    i = 0
    while i < len(spans):
        p0 = spans[i][0]
        j = i
        while j < len(spans) and spans[j][1] - p0 <= PAGE_S:
            j += 1
        j = max(j, i + 1)
        p1 = spans[j - 1][1]
        page = load_audio(path, sr, start_s=p0, duration_s=p1 - p0)
        chunks = []
        for a, b in spans[i:j]:
            s0, s1 = int(round((a - p0) * sr)), int(round((b - p0) * sr))
            chunks.append(page[s0 : min(s1, len(page))])
        for (a, b), enc in zip(spans[i:j], tower.encode_many(chunks), strict=True):
            segs.append(_segment(enc, a, b))
        i = j
    return info.duration, info.sample_rate, info.channels, segs


def _segment(enc, start: float, end: float) -> SegmentIn:
    raw = np.asarray(enc.seq, dtype=np.float32)
    tags = None if enc.tags is None else np.asarray(enc.tags, dtype=np.float32).mean(axis=0)
    return SegmentIn(start, end, raw, tags)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def encode_one(lib, path: str) -> tuple:
    """(duration, sample_rate, channels, [SegmentIn], error or None) of one file with the library's tower
    and windowing: an unreadable file, or one a tower chokes on, is an error string, not an exception."""
    try:
        return (*encode_file(lib.audio_tower, path, long_s=lib.long_s, window_s=lib.window_s,
                             hop_s=lib.hop_s), None)
    except AudioError as exc:
        return None, None, None, [], _reason(exc)
    except AtaeError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # a tower choking on odd input
        return None, None, None, [], f"{type(exc).__name__}: {exc}"


def encode_here(lib, todo):
    """The default encoder: each file of ``todo`` in this process, yielding (item, encode_one's result)."""
    for item in todo:
        yield item, encode_one(lib, item[0].path)


def run_index(lib, roots, *, exts=None, progress: bool = True, batch_files: int = BATCH_FILES,
              encoder=encode_here) -> IndexReport:
    """Bring the library up to date with ``roots`` (the caller holds the writer lock). ``encoder(lib,
    todo)`` yields each (found, kind, hash) item of ``todo`` with its encoding, in any order
    (``encode_here``, or ``atae.library.ray_index`` on a cluster)."""
    t0 = time.perf_counter()
    rep = IndexReport()
    db = lib.db
    sc = scan(roots, exts)
    found, abs_roots = sc.found, sc.roots
    rep.not_scanned = list(sc.problems)
    known = {}
    for r in abs_roots:
        known.update(db.files_under(r))
    on_disk = {f.path for f in found}
    gone = [row for p, row in known.items() if p not in on_disk and any(under(p, r) for r in abs_roots)
            and not any(under(p, b) for b in sc.blind)]
    gone_by_hash = {row.hash: row for row in gone if row.status == "ok" and row.hash}

    todo: list[tuple[Found, str, str | None]] = []  # (found, "new"|"changed", hash)
    touch, moves, fresh = [], [], []
    for f in found:
        row = known.get(f.path)
        if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
            if row.status == "failed":
                rep.previously_failed += 1
            rep.unchanged += 1
            continue
        try:
            h = content_hash(f.path)
        except OSError as exc:
            # not stored as failed: a permission fix does not change mtime, so retry on every run
            rep.failed.append((f.path, f"cannot be read ({exc.strerror or exc}); fix its permissions"))
            continue
        if row is not None and row.status == "ok" and row.hash == h:
            touch.append((row.id, f.size, f.mtime_ns))
            rep.unchanged += 1
        elif row is None and h in gone_by_hash:
            old = gone_by_hash.pop(h)
            moves.append((old.id, f.path, f.size, f.mtime_ns))
        elif row is None:
            fresh.append((f, h))
        else:
            todo.append((f, "changed", h))
    # a new file identical to an indexed one that vanished from another folder: the folder was renamed
    taken = {m[0] for m in moves}
    elsewhere = db.files_with_hash([h for _, h in fresh]) if fresh else {}
    for f, h in fresh:
        old = next((r for r in elsewhere.get(h, ()) if r.id not in taken and r.path not in on_disk
                    and not any(under(r.path, root) for root in abs_roots) and is_missing(r.path)), None)
        if old is None:
            todo.append((f, "new", h))
        else:
            taken.add(old.id)
            moves.append((old.id, f.path, f.size, f.mtime_ns))

    gone = [g for g in gone if g.id not in taken]  # once, not per move (a moved folder is many files)
    # cheap changes first, in one transaction: removals, moves, touched files
    if gone or moves or touch:
        removed_ids = db.segment_ids_of([g.id for g in gone])
        with db.transaction():
            db.delete_files([g.id for g in gone])
            for fid, p, size, mt in moves:
                db.move_file(fid, p, size, mt)
            for fid, size, mt in touch:
                db.touch_file(fid, size, mt)
        lib.drop_vectors(removed_ids)
        rep.removed += len(gone)
        rep.moved += len(moves)

    bar = _progress(len(todo), progress)
    pending: list[tuple] = []
    last_commit = last_save = time.perf_counter()
    try:
        for (f, kind, h), (dur, sr, ch, segs, err) in encoder(lib, todo):
            before = (f.size, f.mtime_ns)
            after = _stat(f.path)
            if after != before:
                why = "disappeared while being indexed" if after is None else "changed while being indexed"
                rep.skipped.append((f.path, f"{why}; the next run picks it up"))
                if after is None and f.path in known:
                    pending.append(("delete", known[f.path].id))
            else:
                pending.append(("put", f, kind, h, dur, sr, ch, segs, err))
                if err is None:
                    rep.audio_seconds += dur or 0.0
            bar.update(1)
            if rep.audio_seconds:
                bar.set_postfix_str(
                    f"{rep.audio_seconds / max(time.perf_counter() - t0, 1e-9):.0f}x rt", refresh=False
                )
            now = time.perf_counter()
            if len(pending) >= batch_files or now - last_commit > BATCH_SECONDS:
                _commit(lib, pending, known, rep)
                pending, last_commit = [], now
                if now - last_save > SAVE_SECONDS:
                    lib.save_index()
                    last_save = now
        _commit(lib, pending, known, rep)
        if hasattr(encoder, "finish"):
            encoder.finish(lib)
    finally:
        bar.close()
        lib.save_index()
    rep.missing_elsewhere, rep.missing_example = missing_elsewhere(db, abs_roots)
    rep.wall_seconds = time.perf_counter() - t0
    return rep


def prune(lib, *, dry_run: bool = False) -> list[str]:
    """Remove the files no longer on disk (``is_missing``) with their vectors (the caller holds the writer
    lock); returns their paths."""
    db = lib.db
    gone = [(fid, p) for fid, p in db.all_paths() if is_missing(p)]
    if gone and not dry_run:
        seg_ids = db.segment_ids_of([fid for fid, _ in gone])
        with db.transaction():
            db.delete_files([fid for fid, _ in gone])
        lib.drop_vectors(seg_ids)
    return [p for _, p in gone]


def missing_elsewhere(db, roots) -> tuple[int, str]:
    """(count, an example path) of indexed files outside ``roots`` whose folder no longer exists: one
    stat per folder, not per file."""
    by_dir: dict[str, list[str]] = {}
    for _fid, p in db.all_paths():
        if not any(under(p, r) for r in roots):
            by_dir.setdefault(os.path.dirname(p), []).append(p)
    gone = [ps for d, ps in by_dir.items() if is_missing(d)]
    return sum(len(ps) for ps in gone), (gone[0][0] if gone else "")


def _reason(exc: AtaeError) -> str:
    msg = str(exc)
    if exc.path and msg.startswith(exc.path + ": "):
        msg = msg[len(exc.path) + 2 :]
    return msg


def _commit(lib, pending, known, rep: IndexReport) -> None:
    if not pending:
        return
    db = lib.db
    replaced = [known[p[1].path].id for p in pending if p[0] == "put" and p[1].path in known]
    replaced += [p[1] for p in pending if p[0] == "delete"]
    old_ids = db.segment_ids_of(replaced)
    encoder, version = lib.audio_tower_key, lib.model_version  # each a meta read: once per batch
    with db.transaction():
        for p in pending:
            if p[0] == "delete":
                db.delete_files([p[1]])
                continue
            _, f, kind, h, dur, sr, ch, segs, err = p
            db.put_file(
                path=f.path,
                size=f.size,
                mtime_ns=f.mtime_ns,
                hash=h,
                duration=dur,
                sample_rate=sr,
                channels=ch,
                encoder=encoder,
                model_version=version if err is None else None,
                status="ok" if err is None else "failed",
                error=err,
                segments=segs,
            )
    for p in pending:
        if p[0] == "delete":
            rep.removed += 1
            continue
        _, f, kind, h, dur, sr, ch, segs, err = p
        if err is not None:
            rep.failed.append((f.path, err))
        elif kind == "new":
            rep.new += 1
        else:
            rep.changed += 1
        rep.segments_added += len(segs)
    lib.drop_vectors(old_ids)
    lib.sync_new_vectors()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="file", desc="indexing", dynamic_ncols=True)
