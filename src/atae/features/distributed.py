"""Audio extraction on a Ray cluster (``atae extract --engine ray``): the rows ``extract_audio`` makes, from
many workers. Needs the optional extra: ``pip install "atae[distributed]"``.

The pipeline (Ray Data), for the items the store does not hold yet:

1. a CPU stage decodes and resamples each file (Ray tasks; an unreadable file becomes a reported failure);
2. the tower runs as a pool of stateful actors (``map_batches`` with a callable class and an
   ``ActorPoolStrategy`` of ``concurrency`` actors, ``num_cpus``/``num_gpus`` each): each actor receives
   the tower once, encodes batches (Ray fuses the decode stage into the same actors) and writes each
   batch's results itself as a *part* in ``<table>/ray-work/``, its commit marker written last, so a part
   without a marker (a worker that died mid-write) is never read; only the part's name goes back;
3. the driver ingests each committed part into the feature store as it arrives (the store's only
   writer) and deletes it afterwards.

A rerun after a killed driver or a lost worker first ingests the parts already committed, then computes
only what is still missing: nothing is lost or stored twice (a part whose keys the store already holds
from the same file is dropped). On a cluster of several machines the feature folder must be on storage
every node sees, since the workers write the parts.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atae.errors import DataError
from atae.features.extract import (
    ExtractReport,
    _audio_current,
    _commit,
    _compact,
    _decode_batch,
    _resolve_table,
    _unique_todo,
    audio_ident,
    encode_checked,
)
from atae.io import atomic_write_bytes, atomic_write_text

WORK_DIR = "ray-work"
MARKER = ".done"


def require_ray():
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DataError("the Ray engine is not installed",
                        fix='pip install "atae[distributed]" (or use --engine local)') from exc
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster at ``address``, or start a local one (once per process)."""
    ray = require_ray()
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # atae reports progress and failures itself
    return ray


# ---------------------------------------------------------------------------------------- the stages
def _decode(batch: dict, sample_rate: int, loader) -> dict:
    if loader is None:
        from atae.audio import load_audio as loader
    items = [(k, p or None) for k, p in zip(batch["key"], batch["path"], strict=True)]
    rows = _decode_batch(items, loader, sample_rate)
    return {"key": [r[0] for r in rows], "path": [str(r[1]) for r in rows],
            "ident": [json.dumps(audio_ident(r[1]) if r[1] else None) for r in rows],
            "wave": [np.zeros(0, np.float32) if r[2] is None else r[2] for r in rows],
            "error": [r[3] or "" for r in rows]}


class _Encode:
    """A Ray actor holding one tower; encodes the decoded waves of each batch into a part in ``work``."""

    def __init__(self, tower, dim: int, work: str):
        self.tower, self.dim, self.work = tower, dim, work

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        encs = encode_checked(self.tower, [batch["wave"][i] for i in ok], self.dim)
        seq: list = [np.zeros((0, self.dim), np.float32)] * len(batch["key"])
        times, tags, error = [np.zeros((0, 2))] * len(seq), [np.zeros((0, 0), np.float32)] * len(seq), \
            list(batch["error"])
        for i, (enc, why) in zip(ok, encs, strict=True):
            if why is not None:
                error[i] = why
                continue
            seq[i], times[i] = np.asarray(enc.seq, np.float32), np.asarray(enc.times, np.float64)
            if enc.tags is not None:
                tags[i] = np.asarray(enc.tags, np.float32)
        results = {"key": batch["key"], "path": batch["path"], "ident": batch["ident"], "seq": seq,
                   "times": times, "tags": tags, "error": error}
        return _write_part(results, self.work)


def _write_part(batch: dict, work: str) -> dict:
    """One committed part of extracted clips (``commit_part``)."""
    good = [i for i, e in enumerate(batch["error"]) if not e]
    has_tags = bool(good) and all(batch["tags"][i].size for i in good)
    arrays = {
        "key": np.array(batch["key"], dtype=str), "path": np.array(batch["path"], dtype=str),
        "ident": np.array(batch["ident"], dtype=str), "error": np.array(batch["error"], dtype=str),
        "length": np.array([len(batch["seq"][i]) if i in good else 0 for i in range(len(batch["key"]))]),
        "seq": _cat([batch["seq"][i] for i in good]), "times": _cat([batch["times"][i] for i in good]),
    }
    if has_tags:
        arrays["tags"] = _cat([batch["tags"][i] for i in good])
    return {"part": [str(commit_part(work, arrays))]}


def commit_part(work: str | Path, arrays: dict) -> Path:
    """Write a worker's results as ``WORK/part-<uuid>.npz``, then its marker: the commit point (a part
    without a marker is a dead worker's and is never read)."""
    path = Path(work) / f"part-{uuid.uuid4().hex}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.with_suffix(MARKER), "")
    return path


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------------------ the driver
def _ingest(table, part: Path, report: ExtractReport, changed: set) -> None:
    """Commit one part into the table (keys whose file changed since are left for the next run)."""
    with np.load(part, allow_pickle=False) as z:  # each member read once: an npz decodes it per access
        keys, paths, idents, errors = (z[k].tolist() for k in ("key", "path", "ident", "error"))
        offsets = np.concatenate([[0], np.cumsum(z["length"])])
        all_seq, all_times = z["seq"], z["times"]
        all_tags = z["tags"] if "tags" in z.files else None
    keep, seqs, times, tags, ident, failures = [], [], [], [], {}, {}
    for j, key in enumerate(keys):
        recorded = json.loads(idents[j])
        if errors[j]:
            failures[key] = (paths[j] or key, errors[j])
            continue
        if recorded != audio_ident(paths[j]) or (key in table and _audio_current(table, key, recorded)):
            continue  # the file changed since it was encoded, or the row is already stored
        a, b = offsets[j], offsets[j + 1]
        keep.append(key)
        seqs.append(all_seq[a:b])
        times.append(all_times[a:b])
        tags.append(all_tags[a:b] if all_tags is not None else None)
        ident[key] = recorded
    has_tags = bool(keep) and tags[0] is not None
    _commit(table, report, changed, ident, keep, seqs, failures, times, tags if has_tags else None)
    part.with_suffix(MARKER).unlink(missing_ok=True)
    part.unlink(missing_ok=True)


def committed_parts(work: Path) -> list[Path]:
    """The parts whose marker was written (a killed run's finished work)."""
    return sorted(p.with_suffix(".npz") for p in work.glob(f"part-*{MARKER}"))


def extract_audio_ray(table_or_store, tower, items: Sequence[tuple[str, str | Path]], *,
                      address: str | None = None, batch_size: int = 16, concurrency: int = 1,
                      num_cpus: float = 1.0, num_gpus: float = 0.0, loader=None,
                      compact: bool = True) -> ExtractReport:
    """``extract_audio`` on Ray (see the module docstring): the same rows, ``report`` and failure policy.

    ``address``: a running cluster (``ray://...`` or ``auto``), else a local one on this machine's CPUs.
    ``concurrency`` tower actors with ``num_cpus``/``num_gpus`` each. ``loader(path, sr)`` defaults to
    ``atae.audio.load_audio`` (it must be importable on the workers)."""
    t0 = time.perf_counter()
    table = _resolve_table(table_or_store, tower, "audio")
    report = ExtractReport()
    work = table.folder / WORK_DIR
    with table.writer():
        work.mkdir(exist_ok=True)
        for leftover in work.glob("*"):  # parts of a worker that died before its marker
            if leftover.suffix != MARKER and not leftover.with_suffix(MARKER).exists():
                leftover.unlink(missing_ok=True)
        for part in committed_parts(work):  # a killed run's finished parts
            _ingest(table, part, report, set())
        todo, ident, report.skipped, changed = _unique_todo(items, table, audio_ident, _audio_current)
        if todo:
            ray = start_ray(address)
            ds = ray.data.from_items([{"key": k, "path": str(p) if p is not None else ""} for k, p in todo])
            ds = ds.map_batches(_decode, batch_size=batch_size, num_cpus=1,
                                fn_kwargs={"sample_rate": tower.sample_rate, "loader": loader})
            ds = ds.map_batches(_Encode, batch_size=batch_size, num_cpus=num_cpus,
                                compute=ray.data.ActorPoolStrategy(size=concurrency),
                                num_gpus=num_gpus, fn_constructor_args=(tower, table.info.dim, str(work)))
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                for part in batch["part"]:
                    _ingest(table, Path(str(part)), report, changed)
        table.update_manifest()
        _compact(table, compact)
    report.seconds = time.perf_counter() - t0
    return report
