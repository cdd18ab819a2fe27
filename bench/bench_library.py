"""Library speed: vector search at 10k / 100k / 1M items, and end-to-end indexing of real audio.

    .venv/bin/python bench/bench_library.py [--sizes 10000,100000,1000000] [--queries 200]
                                            [--hnsw-budget-s 300] [--audio-clips 60]

Synthetic vectors: 512-d, L2-normalised, drawn around 2,000 random cluster centres (centre + noise of
the same norm), so they have the clustered structure of real embeddings; queries come from the same
distribution and are not in the index. (Uniform random 512-d vectors are the worst case for any graph
index and do not resemble embeddings.)

Per size and index kind (flat = exact IndexFlatIP, hnsw = IndexHNSWFlat M=32, efConstruction=80, both
in IndexIDMap2 as the library uses them):
* build time (add) and bytes per item of the saved index;
* single-query latency p50/p95 of the search alone (k=10, one thread, as one web request is served);
* "text query" latency: the real minilm text tower + a 512-d text adapter + the search, per query;
* HNSW recall@10 against exact search for efSearch in a sweep; the reported HNSW latency is at the
  smallest efSearch reaching recall >= 0.98 (the library's default efSearch is 128).
An HNSW build that would exceed ``--hnsw-budget-s`` is stopped and its time extrapolated from the
measured insertion rate (reported as such, with no latency/recall for that size).

End-to-end: ``Library.add`` with the aisfx tower over ESC-50 clips from ../shared (if present): files/s
and seconds of audio per second.

Writes bench/results/library.json and bench/results/library_latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# idle OpenMP workers must sleep, not spin: a spinning build pool steals the core a query runs on
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402

from atae.library import vectors as V  # noqa: E402

DIM = 512
K = 10
EF_SWEEP = [16, 32, 64, 128, 256]


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = centres[rng.integers(0, len(centres), m)]
        x = c + 0.7 * rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def time_queries(index, queries, params=None) -> tuple[list[float], np.ndarray]:
    lat, ids = [], []
    for q in queries:
        t = time.perf_counter()
        _, i = index.search(q[None], K, params=params) if params is not None else index.search(q[None], K)
        lat.append(time.perf_counter() - t)
        ids.append(i[0])
    return lat, np.stack(ids)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def saved_bytes(index) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.faiss"
        faiss.write_index(index, str(p))
        return p.stat().st_size


def text_encoder():
    """(encode(text) -> 512-d query vector, name): real minilm + a random 384->512 text adapter."""
    try:
        import torch

        from atae.model import AlignedModel
        from atae.towers.base import TowerInfo
        from atae.towers.registry import get_text_tower

        torch.set_num_threads(1)  # one query = one thread, as one web request is served
        tt = get_text_tower("minilm")
        model = AlignedModel(TowerInfo("aisfx", "audio", DIM, None, 44100), tt.info)

        def enc(text: str) -> np.ndarray:
            with torch.no_grad():
                z = torch.from_numpy(tt.encode([text])[0])[None]
                return model.embed_text(z, torch.ones(1, z.shape[1], dtype=torch.bool), normalize=True)[
                    0
                ].numpy()

        enc("warm up")
        return enc, "minilm + adapter"
    except Exception as exc:  # noqa: BLE001
        print(f"text tower unavailable ({exc}); text-query latency not measured", file=sys.stderr)
        return None, None


CAPTIONS = [
    "a door creaks open slowly",
    "rain falling on a tin roof",
    "a dog barks twice in the distance",
    "footsteps on gravel",
    "a car engine idles then revs",
    "birds chirping in the morning",
    "a clock ticking in a quiet room",
    "people talking in a busy cafe",
    "thunder rumbles far away",
    "water pouring into a glass",
]


def bench_size(n: int, args, rng, centres, enc) -> dict:
    print(f"\n== {n:,} vectors", flush=True)
    t = time.perf_counter()
    x = clustered(n, rng, centres)
    ids = np.arange(1, n + 1, dtype=np.int64)
    queries = clustered(args.queries, rng, centres)
    print(f"generated in {time.perf_counter() - t:.1f} s", flush=True)
    res: dict = {"n": n}

    faiss.omp_set_num_threads(args.build_threads)
    flat = V.new_index(DIM, "flat")
    t = time.perf_counter()
    flat.add_with_ids(x, ids)
    res["flat"] = {"build_s": time.perf_counter() - t, "bytes_per_item": saved_bytes(flat) / n}
    faiss.omp_set_num_threads(1)
    lat, truth = time_queries(flat, queries)
    res["flat"].update({"search_p50_ms": pct(lat, 50), "search_p95_ms": pct(lat, 95)})
    if enc is not None:
        tl = []
        for i in range(min(args.queries, 50)):
            t = time.perf_counter()
            flat.search(enc(CAPTIONS[i % len(CAPTIONS)])[None], K)
            tl.append(time.perf_counter() - t)
        res["flat"].update({"text_query_p50_ms": pct(tl, 50), "text_query_p95_ms": pct(tl, 95)})
    print("flat", {k: round(v, 3) for k, v in res["flat"].items()}, flush=True)

    # HNSW: build in chunks so a too-slow build can stop and be extrapolated honestly
    faiss.omp_set_num_threads(args.build_threads)
    hnsw = V.new_index(DIM, "hnsw")
    t = time.perf_counter()
    done = 0
    chunk = max(10_000, n // 20)
    while done < n:
        hnsw.add_with_ids(x[done : done + chunk], ids[done : done + chunk])
        done = min(n, done + chunk)
        el = time.perf_counter() - t
        if done < n and el / done * n > args.hnsw_budget_s and el > 20:
            rate = done / el
            # insertion cost grows ~log n: extrapolate the remaining items at the current rate x 1.1
            est = el + (n - done) / rate * 1.1
            res["hnsw"] = {
                "built": False,
                "inserted": done,
                "elapsed_s": el,
                "build_s_extrapolated": est,
                "note": f"stopped: projected build > budget {args.hnsw_budget_s:.0f} s "
                f"with {args.build_threads} threads",
            }
            print("hnsw", res["hnsw"], flush=True)
            return res
    res["hnsw"] = {
        "built": True,
        "build_s": time.perf_counter() - t,
        "bytes_per_item": saved_bytes(hnsw) / n,
        "M": V.HNSW_M,
        "efConstruction": V.HNSW_EF_CONSTRUCTION,
    }
    faiss.omp_set_num_threads(1)
    sweep = []
    for ef in EF_SWEEP:
        lat, found = time_queries(hnsw, queries, faiss.SearchParametersHNSW(efSearch=ef))
        sweep.append(
            {
                "efSearch": ef,
                "recall@10": recall_at_k(found, truth),
                "search_p50_ms": pct(lat, 50),
                "search_p95_ms": pct(lat, 95),
            }
        )
    res["hnsw"]["sweep"] = sweep
    ok = [s for s in sweep if s["recall@10"] >= 0.98]
    best = ok[0] if ok else sweep[-1]
    res["hnsw"].update(
        {
            "chosen_efSearch": best["efSearch"],
            "recall@10": best["recall@10"],
            "search_p50_ms": best["search_p50_ms"],
            "search_p95_ms": best["search_p95_ms"],
        }
    )
    if enc is not None:
        params = faiss.SearchParametersHNSW(efSearch=best["efSearch"])
        tl = []
        for i in range(min(args.queries, 50)):
            t = time.perf_counter()
            hnsw.search(enc(CAPTIONS[i % len(CAPTIONS)])[None], K, params=params)
            tl.append(time.perf_counter() - t)
        res["hnsw"].update({"text_query_p50_ms": pct(tl, 50), "text_query_p95_ms": pct(tl, 95)})
    print("hnsw", {k: v for k, v in res["hnsw"].items() if k != "sweep"}, flush=True)
    for s in sweep:
        print("   ", s, flush=True)
    return res


def bench_product_search(n: int, rng, centres, queries: int = 50) -> dict | None:
    """``Library.search(text)`` end to end (validation, minilm, adapter, FAISS flat, SQLite lookups of
    the hits, per-file grouping) on a library of ``n`` one-segment files whose raw 512-d vectors are
    written straight into SQLite (no audio), with a random adapter model."""
    try:
        import torch

        from atae.library import Library
        from atae.library.db import SegmentIn
        from atae.model import AlignedModel
        from atae.towers.base import AudioEncoding, AudioTower, TowerInfo
        from atae.towers.registry import get_text_tower
    except ImportError as exc:
        print(f"product search not measured ({exc})", file=sys.stderr)
        return None

    class Fake512(AudioTower):
        name, sample_rate, dim = "fake512", 16000, DIM

        @property
        def info(self):
            return TowerInfo("fake512", "audio", DIM, None, 16000, {})

        def encode(self, wave):
            return AudioEncoding(np.zeros((1, DIM), np.float32), np.zeros((1, 2)))

    torch.set_num_threads(1)
    tt = get_text_tower("minilm")
    torch.manual_seed(0)
    model = AlignedModel(Fake512().info, tt.info)
    x = clustered(n, rng, centres)
    with tempfile.TemporaryDirectory() as d:
        lib = Library.open(
            Path(d) / "lib", create=True, audio_tower=Fake512(), text_tower=tt, model=model, index="flat"
        )
        t = time.perf_counter()
        for s0 in range(0, n, 5000):
            with lib.db.transaction():
                for i in range(s0, min(n, s0 + 5000)):
                    lib.db.put_file(
                        path=f"/lib/clip_{i:07d}.wav",
                        size=1,
                        mtime_ns=1,
                        hash=None,
                        duration=10.0,
                        sample_rate=16000,
                        channels=1,
                        encoder="fake512",
                        model_version=None,
                        status="ok",
                        error=None,
                        segments=[SegmentIn(0.0, 10.0, x[i][None])],
                    )
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        lib._refresh(force=True)
        embed_s = time.perf_counter() - t
        lib.search("warm up", k=10)
        lat = []
        for i in range(queries):
            t = time.perf_counter()
            lib.search(CAPTIONS[i % len(CAPTIONS)] + f" {i}", k=10)
            lat.append(time.perf_counter() - t)
        db_mb = (Path(d) / "lib" / "library.sqlite").stat().st_size / 1e6
        lib.close()
    out = {
        "n": n,
        "index": "flat",
        "sqlite_insert_s": insert_s,
        "embed_and_build_s": embed_s,
        "sqlite_mb": db_mb,
        "search_p50_ms": pct(lat, 50),
        "search_p95_ms": pct(lat, 95),
    }
    print("product search", out, flush=True)
    return out


def bench_indexing(n_clips: int) -> dict | None:
    shared = Path(os.environ.get("ATAE_SHARED", ROOT.parent / "shared"))
    src = shared / "data" / "esc50" / "audio_16k"
    if not src.is_dir():
        print("../shared absent: end-to-end indexing not measured", file=sys.stderr)
        return None
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".ogg", ".wav", ".flac"))[:n_clips]
    import torch

    from atae.library import Library

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        lib = Library.open(Path(d) / "lib", create=True, audio_encoder="aisfx")
        t = time.perf_counter()
        rep = lib.add(files)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        rep2 = lib.add(files)
        again = time.perf_counter() - t
        lib.close()
    out = {
        "tower": "aisfx",
        "files": len(files),
        "wall_s": wall,
        "files_per_s": len(files) / wall,
        "audio_s": rep.audio_seconds,
        "x_realtime": rep.audio_seconds / wall,
        "failed": len(rep.failed),
        "rerun_unchanged_s": again,
        "rerun_unchanged": rep2.unchanged,
        "torch_threads": 2,
    }
    print("indexing", out, flush=True)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style, color in (("flat", "o-", "tab:blue"), ("hnsw", "s-", "tab:red")):
        pts = [(r["n"], r[kind]) for r in results if r[kind].get("search_p50_ms") is not None]
        if not pts:
            continue
        ns = [p[0] for p in pts]
        ax.plot(ns, [p[1]["search_p50_ms"] for p in pts], style, color=color, label=f"{kind}: search p50")
        ax.plot(
            ns,
            [p[1]["search_p95_ms"] for p in pts],
            style,
            color=color,
            alpha=0.35,
            label=f"{kind}: search p95",
        )
        if all("text_query_p50_ms" in p[1] for p in pts):
            ax.plot(
                ns,
                [p[1]["text_query_p50_ms"] for p in pts],
                style[0] + "--",
                color=color,
                label=f"{kind}: text encode + search p50",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("library size (512-d vectors)")
    ax.set_ylabel("latency per query (ms, one thread)")
    ax.set_title("atae library query latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hnsw-budget-s", type=float, default=300.0)
    ap.add_argument("--audio-clips", type=int, default=60)
    ap.add_argument("--product-n", type=int, default=100_000, help="Library.search end-to-end size.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "library.json"))
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from an existing --out JSON.")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text())["sizes"], Path(args.out).with_name("library_latency.png"))
        return
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, DIM), dtype=np.float32) / np.sqrt(DIM)
    enc, enc_name = text_encoder()
    results = [bench_size(int(n), args, rng, centres, enc) for n in args.sizes.split(",")]
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "note": "2 shared cores; other jobs were running, so absolute numbers are pessimistic",
        },
        "dim": DIM,
        "k": K,
        "queries": args.queries,
        "text_encoder": enc_name,
        "build_threads": args.build_threads,
        "sizes": results,
        "product_search": bench_product_search(args.product_n, rng, centres),
        "indexing": bench_indexing(args.audio_clips),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    plot(results, path.with_name("library_latency.png"))
    print(f"\nwrote {path} and {path.with_name('library_latency.png')}")


if __name__ == "__main__":
    main()
