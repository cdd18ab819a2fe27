"""Extraction throughput: the sequential path against Ray Data (``atae extract --engine ray``), same machine.

    python bench/bench_ray.py [--n 200] [--workers 1 2] [--json bench/results/ray.json]

Reads ESC-50 clips from ../shared (16 kHz Ogg, 5 s each) and extracts them with EfficientAT mn04 into a
fresh feature store per run: first ``extract_audio`` (the reference), then ``extract_audio_ray`` with each
number of tower actors. Ray's start (``ray.init``) is timed apart from the job, since a cluster is
started once and serves many jobs. Every run's rows are checked against the reference's. Prints clips/s
and the ratio to the reference; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import MN04_WEIGHTS, esc50, shared_root  # noqa: E402


def _cpu() -> float:
    t = os.times()  # children included: Ray's workers are child processes of this one
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "ray.json")
    args = ap.parse_args()
    shared = shared_root()
    if shared is None:
        sys.exit("bench_ray needs ../shared (ESC-50 clips and the mn04 weights); set ATAE_SHARED")

    from atae.features import FeatureStore, extract_audio
    from atae.features.distributed import extract_audio_ray, start_ray
    from atae.towers.registry import get_audio_tower

    tower = get_audio_tower("efficientat-mn04", weights=shared / MN04_WEIGHTS)
    files = esc50(shared)[0][: args.n]
    items = [(f.name, f) for f in files]
    audio_s = 5.0 * len(items)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        def timed(name, fn):
            store = FeatureStore(Path(tmp) / name)
            t0, c0 = time.perf_counter(), _cpu()
            rep = fn(store)
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            assert rep.done == len(items) and not rep.failed, (name, rep.done, rep.failed)
            run = {"engine": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                   "clips_per_s": round(len(items) / wall, 2), "x_real_time": round(audio_s / wall, 1)}
            runs.append(run)
            return store.audio_table(tower.info)

        ref = timed("sequential", lambda s: extract_audio(s, tower, items, batch_size=args.batch_size,
                                                           progress=False))
        t0 = time.perf_counter()
        start_ray(num_cpus=os.cpu_count())
        ray_start = time.perf_counter() - t0
        for w in args.workers:
            got = timed(f"ray, {w} tower actor{'s' if w > 1 else ''}",
                        lambda s, w=w: extract_audio_ray(s, tower, items, batch_size=args.batch_size,
                                                         concurrency=w))
            worst = max(float(np.abs(np.asarray(got.get(k)) - np.asarray(ref.get(k))).max())
                        for k in ref.keys)
            runs[-1]["max_abs_diff_vs_sequential"] = worst
    base = runs[0]["wall_s"]
    for r in runs:
        r["speed_vs_sequential"] = round(base / r["wall_s"], 2)
        print(f"{r['engine']:<24} {r['wall_s']:>7.1f} s  {r['clips_per_s']:>6.1f} clips/s  "
              f"{r['x_real_time']:>6.1f}x real time  {r['speed_vs_sequential']:.2f}x sequential")
    print(f"ray.init: {ray_start:.1f} s (once per cluster, not in the rows above)")
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
           "tower": "efficientat-mn04", "clips": len(items), "audio_s": audio_s,
           "batch_size": args.batch_size, "ray_init_s": round(ray_start, 2), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print("wrote", args.json)


if __name__ == "__main__":
    main()
