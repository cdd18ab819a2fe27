"""Extraction: run a frozen tower over the items of a dataset and commit its outputs to the store.

One committed shard per batch (``atae.features.store``), so an interrupted run resumes where it stopped;
unreadable files and empty captions are reported and recorded, and the run goes on. Rows are
content-addressed (``text_ident``/``audio_ident``): a changed caption or file is extracted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atae.errors import AtaeError, AudioError, DataError
from atae.features.store import FeatureStore, SequenceTable, caption_key
from atae.printable import escape
from atae.towers.base import AudioEncoding, AudioTower, TextTower


@dataclass
class ExtractReport:
    """What one extraction did. ``failed``: (path or key, reason) of every item that has no features."""

    done: int = 0
    skipped: int = 0  # already in the store
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    parts: dict[str, ExtractReport] = field(default_factory=dict)  # "audio"/"text" in a combined report
    # of ``done``: keys that were cached but re-extracted because their text/file changed since (or,
    # for captions cached before format 2, because what they were computed from was not recorded)
    changed: int = 0

    def __add__(self, other: ExtractReport) -> ExtractReport:
        return ExtractReport(self.done + other.done, self.skipped + other.skipped,
                             self.failed + other.failed, self.seconds + other.seconds,
                             changed=self.changed + other.changed)

    def summary(self) -> str:
        def changed(r):
            return f" ({r.changed} of them changed since cached)" if r.changed else ""

        lines = [f"{self.done} extracted{changed(self)}, {self.skipped} already cached, "
                 f"{len(self.failed)} failed ({self.seconds:.1f} s)"]
        for what, r in self.parts.items():
            lines.append(f"  {what}: {r.done} extracted{changed(r)}, {r.skipped} cached, "
                         f"{len(r.failed)} failed")
        for path, reason in self.failed:  # untrusted names: one line each, nothing a terminal acts on
            lines.append(f"  failed: {escape(path)}: {escape(reason)}")
        return "\n".join(lines)


def _resolve_table(table_or_store, tower, kind: str) -> SequenceTable:
    if isinstance(table_or_store, FeatureStore):
        return table_or_store.table(tower.info)
    if isinstance(table_or_store, (str, Path)):
        return FeatureStore(table_or_store).table(tower.info)
    table = table_or_store
    if table.info.to_dict() != tower.info.to_dict() or table.info.kind != kind:
        raise DataError(f"the table holds features of {table.info.name} ({table.info.key()}), "
                        f"not of the {kind} tower {tower.info.name} ({tower.info.key()})",
                        path=table.folder, fix="open the table with FeatureStore.table(tower.info)")
    return table


def text_ident(text: str) -> str:
    """What a caption row is computed from: ``"sha1:<hex>"`` of the exact UTF-8 text."""
    return "sha1:" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def audio_ident(path: str | Path | None) -> dict | None:
    """What an audio row is computed from: absolute path, size and mtime_ns (a ``stat``; the content is
    not hashed, which would cost as much as decoding). None when the file cannot be stat'ed."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": os.path.abspath(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _text_current(table: SequenceTable, key: str, new) -> bool:
    return new is not None and table.ident(key) == new  # unrecorded (before format 2): re-encode


def _audio_current(table: SequenceTable, key: str, new) -> bool:
    if new is None:
        return True  # cannot stat it now: the cached row is all there is; keep it
    old = table.ident(key)
    if old is None:  # cached before format 2: trust it unless the file was modified after the commit
        return new["mtime_ns"] <= table.committed_at(key) * 1e9
    return old == new


def _unique_todo(items, table: SequenceTable, ident_of: Callable, current: Callable):
    """(todo [(key, value)], {key: ident}, skipped, changed keys): first occurrence of a key wins."""
    seen, todo, idents, skipped, changed = set(), [], {}, 0, set()
    for key, value in items:
        if key in seen:
            continue
        seen.add(key)
        ident = ident_of(value)
        if key in table:
            if current(table, key, ident):
                skipped += 1
                continue
            changed.add(key)
        todo.append((key, value))
        idents[key] = ident
    return todo, idents, skipped, changed


def _commit(table: SequenceTable, report: ExtractReport, changed: set, ident: dict, keys: list[str],
            seqs: list[np.ndarray], failures: dict[str, tuple[str, str]], times=None, tags=None) -> None:
    """Commit one extraction batch and count it; audio and text share the policy: an item that was
    cached but now fails is deleted, so its stale row stops being served."""
    table.append(keys, seqs, times, tags, idents=[ident[k] for k in keys],
                 deleted=[k for k in failures if k in table])
    table.set_failures(failures, succeeded=keys)
    report.done += len(keys)
    report.changed += len(changed.intersection(keys))
    report.failed.extend(failures.values())


def _progress(total: int, desc: str, progress: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's BLAS at >1 thread next to torch slowed feature loops 2-2.5x on 2 cores (facts.md §4)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _decode_batch(batch, loader, sample_rate):
    out = []
    for key, path in batch:
        if path is None:
            out.append((key, "", None, f"{key}: audio file not found"))
            continue
        try:
            wave = np.asarray(loader(path, sample_rate), dtype=np.float32)
            if wave.ndim != 1 or wave.size == 0:
                raise AudioError("decoded to no samples", path=path, fix="check the file")
            out.append((key, path, wave, None))
        except AtaeError as e:
            msg = str(e)  # the report pairs the reason with the path already: do not repeat it
            out.append((key, path, None, msg.removeprefix(f"{e.path}: ") if e.path else msg))
        except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file failure
            out.append((key, path, None, f"{type(e).__name__}: {e}"))
    return out


def extract_audio(table_or_store, tower: AudioTower, items: Sequence[tuple[str, str | Path]], *,
                  batch_size: int = 16, progress: bool = True, num_workers: int | None = None,
                  loader: Callable | None = None, compact: bool = True) -> ExtractReport:
    """Encode ``(key, audio path)`` items not yet in the store, one committed shard per batch.

    A stored key whose file changed (``audio_ident``: path, size or mtime_ns differ from extraction
    time) is encoded again and supersedes the old row (``report.changed``); a file that cannot be
    stat'ed keeps its cached row.

    ``num_workers=1`` decodes the next batch in a background thread while the tower runs the current
    one (soundfile and soxr release the GIL); 0 decodes inline; None (default) picks 1 only with at
    least 4 CPUs. Measured with aisfx on 2 busy cores (bench/bench_features.py): decoding is ~3-7% of
    the tower's time, so overlap can win at most that, and a second busy thread there cost more than
    it saved. ``loader(path, sr)`` defaults to ``atae.audio.load_audio``. Unreadable files are
    reported, recorded in ``failed.json`` and skipped; the run goes on.
    """
    if loader is None:
        from atae.audio import load_audio as loader
    t0 = time.perf_counter()
    table = _resolve_table(table_or_store, tower, "audio")
    report = ExtractReport()
    if num_workers is None:
        num_workers = 1 if (os.cpu_count() or 1) >= 4 else 0
    with table.writer(), _one_blas_thread():
        todo, ident, report.skipped, changed = _unique_todo(items, table, audio_ident, _audio_current)
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), max(1, batch_size))]
        bar = _progress(len(todo), f"audio {tower.info.name}", progress, "clip")
        pool = ThreadPoolExecutor(1) if num_workers > 0 and len(batches) > 1 else None
        try:
            nxt = pool.submit(_decode_batch, batches[0], loader, tower.sample_rate) if pool and batches \
                else None
            for bi, batch in enumerate(batches):
                decoded = nxt.result() if pool else _decode_batch(batch, loader, tower.sample_rate)
                if pool and bi + 1 < len(batches):
                    nxt = pool.submit(_decode_batch, batches[bi + 1], loader, tower.sample_rate)
                failures = {k: (str(p) or k, r) for k, p, w, r in decoded if w is None}
                good = [(k, w) for k, p, w, r in decoded if w is not None]
                encs = encode_checked(tower, [w for _, w in good], table.info.dim)
                keys, seqs, times, tags = [], [], [], []
                for (k, _), (enc, why) in zip(good, encs, strict=True):
                    if why is not None:
                        failures[k] = (str(dict(batch)[k]), why)
                        continue
                    keys.append(k)
                    seqs.append(enc.seq)
                    times.append(enc.times)
                    tags.append(enc.tags)
                with_tags = bool(tags) and tags[0] is not None  # all or none (encode_checked)
                _commit(table, report, changed, ident, keys, seqs, failures, times,
                        tags if with_tags else None)
                bar.update(len(batch))
                if failures:
                    bar.set_postfix(failed=len(report.failed))
        finally:
            bar.close()
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
            table.update_manifest()
        _compact(table, compact)
    report.seconds = time.perf_counter() - t0
    return report


def _compact(table, compact: bool) -> None:
    """Merge a run's small shards (``compact``) and rewrite the manifest over the result."""
    if compact:
        table.compact()
        table.update_manifest()


def encode_checked(tower, waves: list, dim: int) -> list[tuple[AudioEncoding | None, str | None]]:
    """``tower.encode_many(waves)``, each encoding with why it is unusable (None: usable). A tower that
    answers for some clips only, or tags some clips only, has a bug: RuntimeError."""
    encs: list[AudioEncoding] = tower.encode_many(waves) if waves else []
    if len(encs) != len(waves):
        raise RuntimeError(f"{tower.info.name}.encode_many returned {len(encs)} for {len(waves)}")
    out = [(enc, None) if enc.seq.ndim == 2 and enc.seq.shape[0] >= 1 and enc.seq.shape[1] == dim
           else (None, f"tower returned shape {enc.seq.shape}") for enc in encs]
    with_tags = [enc.tags is not None for enc, _ in out if enc is not None]
    if any(with_tags) and not all(with_tags):
        raise RuntimeError(f"{tower.info.name} returned tags for some clips only")
    return out


def extract_text(table_or_store, tower: TextTower, items: Sequence[tuple[str, str]], *,
                 batch_size: int = 64, progress: bool = True, compact: bool = True) -> ExtractReport:
    """Encode ``(key, text)`` items not in the store, or stored from a different text (``text_ident``:
    the new row supersedes the old, counted in ``report.changed``). Empty/blank texts are reported, not
    encoded (and drop a stale row of the same key)."""
    t0 = time.perf_counter()
    table = _resolve_table(table_or_store, tower, "text")
    report = ExtractReport()
    with table.writer(), _one_blas_thread():
        todo, ident, report.skipped, changed = _unique_todo(
            items, table, lambda t: text_ident(t) if isinstance(t, str) else None, _text_current)
        bar = _progress(len(todo), f"text {tower.info.name}", progress, "text")
        try:
            for i in range(0, len(todo), max(1, batch_size)):
                batch = todo[i:i + batch_size]
                failures: dict[str, tuple[str, str]] = {}
                good = []
                for k, text in batch:
                    if not isinstance(text, str) or not text.strip():
                        failures[k] = (k, "empty caption")
                    else:
                        good.append((k, text))
                seqs = tower.encode([t for _, t in good]) if good else []
                if len(seqs) != len(good):
                    raise RuntimeError(f"{tower.info.name}.encode returned {len(seqs)} for {len(good)}")
                keys, ok = [], []
                for (k, _), s in zip(good, seqs, strict=True):
                    s = np.asarray(s, dtype=np.float32)
                    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] != table.info.dim:
                        failures[k] = (k, f"tower returned shape {s.shape}")
                        continue
                    keys.append(k)
                    ok.append(s)
                _commit(table, report, changed, ident, keys, ok, failures)
                bar.update(len(batch))
        finally:
            bar.close()
            table.update_manifest()
        _compact(table, compact)
    report.seconds = time.perf_counter() - t0
    return report


def ensure_dataset_features(dataset, audio_tower: AudioTower, text_tower: TextTower, feats_dir, *,
                            progress: bool = True, batch_size: int | None = None, loader=None,
                            engine: str = "local", ray_address: str | None = None, workers: int = 1):
    """Make sure every clip and caption of ``dataset`` is cached; returns (audio, text, report).

    Audio keys are clip keys; text keys are ``caption_key(clip.key, i)``. Idempotent: when everything
    is cached no tower runs (failed items are retried, which for unreadable audio costs a decode only).
    ``engine="ray"``: the audio runs on a Ray cluster (``atae.features.distributed``; ``ray_address``,
    ``workers`` tower actors); captions are cheap and stay here.
    """
    store = FeatureStore(feats_dir)
    audio_items = [(c.key, c.path) for c in dataset.clips]
    text_items = [(caption_key(c.key, i), cap) for c in dataset.clips for i, cap in enumerate(c.captions)]
    a_kw = {"batch_size": batch_size} if batch_size else {}
    t_kw = {"batch_size": max(batch_size, 64)} if batch_size else {}
    audio_table = store.audio_table(audio_tower.info)
    if engine == "ray":
        from atae.device import gpus_per_worker
        from atae.features.distributed import extract_audio_ray

        ra = extract_audio_ray(audio_table, audio_tower, audio_items, address=ray_address,
                               concurrency=workers, loader=loader,
                               num_gpus=gpus_per_worker(getattr(audio_tower, "device", "cpu")), **a_kw)
    elif engine == "local":
        ra = extract_audio(audio_table, audio_tower, audio_items, progress=progress, loader=loader, **a_kw)
    else:
        raise DataError(f"unknown engine {engine!r}", fix="use --engine local or ray")
    text_table = store.text_table(text_tower.info)
    rt = extract_text(text_table, text_tower, text_items, progress=progress, **t_kw)
    report = ra + rt
    report.parts = {"audio": ra, "text": rt}
    return audio_table, text_table, report


def dataset_queries(dataset, audio_table, text_table):
    """DCASE 2022 layout of a caption dataset: (candidate keys, caption texts, text keys, relevant
    column per caption, problems). Clips without audio features and captions without text features
    are left out and listed."""
    problems, cands = [], []
    texts, tkeys, rel = [], [], []
    for c in dataset.clips:
        if c.key not in audio_table:
            problems.append(f"{c.key}: no audio features (unreadable audio?), clip and its captions left out")
            continue
        j = len(cands)
        cands.append(c.key)
        for i, cap in enumerate(c.captions):
            k = caption_key(c.key, i)
            if k not in text_table:
                problems.append(f"{k}: no text features, caption left out")
                continue
            texts.append(cap)
            tkeys.append(k)
            rel.append(j)
    return cands, texts, tkeys, rel, problems
