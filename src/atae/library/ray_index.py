"""Indexing on a Ray cluster (``atae index --engine ray``): the files the indexer decided to (re)encode are
encoded by a pool of tower actors; this process still decides what to do and commits every result itself,
so the library's rules (incremental, crash-safe, one writer) are the sequential path's. Needs the optional
extra: ``pip install "atae[distributed]"``.

Pipeline (Ray Data): the files → the tower as a pool of stateful actors (``map_batches`` with a callable
class; each actor holds the library's tower and windowing and runs ``indexer.encode_file``: it decodes in
pages and encodes each window, then writes the batch's results as a *part* in ``LIB/ray-work/``, its
commit marker last) → the indexer ingests parts as they arrive.

A rerun after a killed driver or a lost worker reuses the committed parts of files whose size and mtime
are unchanged, instead of encoding them again; parts are deleted once the run has committed everything.
On several machines the library folder must be on storage every node sees (the workers write the parts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from atae.features.distributed import WORK_DIR, commit_part, committed_parts, start_ray
from atae.library.db import SegmentIn


class _EncodeFiles:
    """A Ray actor: one tower and the library's windowing; encodes whole files (``encode_file``) and writes
    each batch as a part in ``work``."""

    def __init__(self, tower, long_s: float, window_s: float, hop_s: float, work: str):
        from types import SimpleNamespace

        self.lib = SimpleNamespace(audio_tower=tower, long_s=long_s, window_s=window_s, hop_s=hop_s)
        self.work = work

    def __call__(self, batch: dict) -> dict:
        from atae.library.indexer import encode_one

        out = [encode_one(self.lib, str(p)) for p in batch["path"]]
        results = {"path": batch["path"], "size": batch["size"], "mtime_ns": batch["mtime_ns"],
                   "result": [json.dumps(_pack_meta(r)) for r in out],
                   "raw": [np.concatenate([s.raw for s in r[3]]) if r[3] else np.zeros((0, 0), np.float32)
                           for r in out],
                   "tags": [np.stack([s.tags for s in r[3]]) if r[3] and r[3][0].tags is not None
                            else np.zeros((0, 0), np.float32) for r in out]}
        return _write_part(results, self.work)


def _pack_meta(r) -> dict:
    dur, sr, ch, segs, err = r
    return {"duration": dur, "sample_rate": sr, "channels": ch, "error": err,
            "spans": [[s.start_s, s.end_s, int(len(s.raw))] for s in segs]}


def _write_part(batch: dict, work: str) -> dict:
    """One committed part (all of a batch's files, ``commit_part``)."""
    arrays = {"path": np.array(batch["path"], dtype=str), "size": np.asarray(batch["size"], np.int64),
              "mtime_ns": np.asarray(batch["mtime_ns"], np.int64),
              "result": np.array(batch["result"], dtype=str)}
    for i, (raw, tags) in enumerate(zip(batch["raw"], batch["tags"], strict=True)):
        arrays[f"raw{i}"], arrays[f"tags{i}"] = raw, tags
    return {"part": [str(commit_part(work, arrays))]}


def _read_part(path: Path) -> dict:
    """{(path, size, mtime_ns): encode_one's result} of one part."""
    out = {}
    with np.load(path, allow_pickle=False) as z:  # each member read once: an npz decodes it per access
        results, sizes, mtimes = z["result"], z["size"], z["mtime_ns"]
        for i, p in enumerate(z["path"].tolist()):
            meta = json.loads(str(results[i]))
            raw, tags = z[f"raw{i}"], z[f"tags{i}"]
            segs, at = [], 0
            for j, (a, b, n) in enumerate(meta["spans"]):
                segs.append(SegmentIn(a, b, raw[at:at + n], tags[j] if tags.size else None))
                at += n
            out[(p, int(sizes[i]), int(mtimes[i]))] = (meta["duration"], meta["sample_rate"],
                                                       meta["channels"], segs, meta["error"])
    return out


class RayEncoder:
    """An ``encoder`` for ``indexer.run_index`` (see the module docstring)."""

    def __init__(self, address: str | None = None, workers: int = 1, batch_files: int = 4,
                 num_cpus: float = 1.0, num_gpus: float = 0.0):
        self.address, self.workers, self.batch_files = address, int(workers), int(batch_files)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def __call__(self, lib, todo):
        work = Path(lib.root) / WORK_DIR
        work.mkdir(exist_ok=True)
        wanted = {(it[0].path, it[0].size, it[0].mtime_ns): it for it in todo}
        for part in committed_parts(work):  # a killed run's finished parts, read one at a time
            for f, result in _read_part(part).items():
                if f in wanted:
                    yield wanted.pop(f), result
        rest = list(wanted.values())
        if rest:
            by_path = {it[0].path: it for it in rest}
            ray = start_ray(self.address)
            ds = ray.data.from_items([{"path": it[0].path, "size": it[0].size, "mtime_ns": it[0].mtime_ns}
                                      for it in rest])
            ds = ds.map_batches(_EncodeFiles, batch_size=self.batch_files,
                                compute=ray.data.ActorPoolStrategy(size=self.workers),
                                num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                fn_constructor_args=(lib.audio_tower, lib.long_s, lib.window_s, lib.hop_s,
                                                     str(work)))
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                for part in batch["part"]:
                    for (path, _, _), result in _read_part(Path(str(part))).items():
                        yield by_path[path], result

    @staticmethod
    def finish(lib) -> None:
        """After the run committed every result: its parts are no longer needed."""
        shutil.rmtree(Path(lib.root) / WORK_DIR, ignore_errors=True)
