"""Feature-store extraction throughput: inline decoding vs a background decoding thread.

    python bench/bench_features.py [--audio-dir DIR] [--n 48] [--tower aisfx] [--threads 1] [--json OUT]

Without --audio-dir it writes N synthetic 5 s stereo 48 kHz FLAC files (decode + resample work like a
real dataset). Prints JSON: decode-only and encode-only seconds, and clips/s of ``extract_audio`` with
``num_workers`` 0 and 1 (each into a fresh store).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio-dir", type=Path)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--tower", default="aisfx")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import soundfile as sf
    import torch

    torch.set_num_threads(args.threads)
    from atae.audio import AUDIO_EXTENSIONS, load_audio
    from atae.features import FeatureStore, extract_audio
    from atae.towers.registry import get_audio_tower

    tower = get_audio_tower(args.tower)
    with tempfile.TemporaryDirectory() as tmp:
        if args.audio_dir:
            files = sorted(p for p in args.audio_dir.rglob("*")
                           if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS)
            files = files[: args.n]
        else:
            rng = np.random.default_rng(0)
            files = []
            for i in range(args.n):
                p = Path(tmp) / f"s{i:04d}.flac"
                sf.write(p, (0.1 * rng.standard_normal((48000 * 5, 2))).astype(np.float32), 48000)
                files.append(p)
        items = [(p.name, p) for p in files]

        t0 = time.perf_counter()
        waves = [load_audio(p, tower.sample_rate) for p in files]
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(waves), args.batch_size):
            tower.encode_many(waves[i:i + args.batch_size])
        t_encode = time.perf_counter() - t0

        runs = {}
        for workers in (0, 1):
            store = FeatureStore(Path(tmp) / f"feats{workers}")
            t0 = time.perf_counter()
            rep = extract_audio(store, tower, items, batch_size=args.batch_size, progress=False,
                                num_workers=workers)
            dt = time.perf_counter() - t0
            runs[f"num_workers={workers}"] = {"seconds": round(dt, 3), "clips_per_s": round(rep.done / dt, 2),
                                             "failed": len(rep.failed)}
    out = {
        "tower": tower.info.key(), "clips": len(items), "batch_size": args.batch_size,
        "torch_threads": args.threads, "cpu_count": os.cpu_count(),
        "decode_only_s": round(t_decode, 3), "encode_only_s": round(t_encode, 3), "extract": runs,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
