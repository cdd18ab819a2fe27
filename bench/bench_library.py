"""Library speed: vector search at 10k / 100k / 1M items, and end-to-end indexing of real audio.

    .venv/bin/python bench/bench_library.py [--sizes 10000,100000] [--queries 200]
                                            [--hnsw-budget-s 900] [--hnsw-grid 16:40,24:48]
                                            [--audio-clips 60] [--skip-product] [--skip-indexing]

A skipped section (--skip-*) keeps the previous JSON's numbers, marked ``from_previous_run``.

1M is opt-in (``--sizes 10000,100000,1000000``): its HNSW build takes ~10+ min on 2 cores.

Synthetic vectors: 512-d, L2-normalised, a Gaussian mixture around 2,000 random centres on the sphere
(centre + isotropic noise of norm ~0.7, renormalised), so they have the clustered structure of real
embeddings; queries come from the same distribution and are not in the index. (Uniform random 512-d
vectors are the worst case for any graph index and do not resemble embeddings; real embeddings may still
be harder or easier than this proxy.)

Per size and index kind (flat = exact IndexFlatIP, hnsw = IndexHNSWFlat with the library's defaults
``vectors.HNSW_M`` / ``HNSW_EF_CONSTRUCTION``, both in IndexIDMap2 as the library uses them):
* build time (add, ``--build-threads`` OpenMP threads) and bytes per item of the saved index;
* single-query latency p50/p95 of the search alone (k=10, one thread, as one web request is served);
* "text query" latency: the real minilm text tower (uncached) + a 512-d text adapter + the search;
* HNSW recall@10 against exact search for efSearch in a sweep; the headline HNSW numbers are at the
  library's default efSearch (``vectors.HNSW_EF_SEARCH``), and the smallest efSearch reaching 0.98 is
  reported too;
* ratios: exact / HNSW search p50 and the share of the text query spent encoding the text.
Latencies are wall-clock; most also have a ``*_cpu_p50_ms`` twin (process CPU time per query): on a
shared, loaded machine the wall time includes waiting for a core, the CPU time is what a query costs
on an idle one.
``--hnsw-grid M:efC,...`` also builds those HNSW variants (build time, recall and latency vs efSearch),
the sweep used to choose the defaults. An HNSW build that would exceed ``--hnsw-budget-s`` is stopped
and its time extrapolated from the measured insertion rate (reported as such, with no latency/recall).

Text encoding alone (once): p50/p95 of the minilm encode of one short query on 1 and 2 torch threads,
of the adapter, and of a repeated query served by the tower's LRU cache.

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


def time_queries(index, queries, params=None, cpu: list | None = None) -> tuple[list[float], np.ndarray]:
    """Wall latency per query (and, into ``cpu``, the process CPU time: on a shared machine the wall time
    includes waiting for a core, the CPU time is what the query costs on an idle one)."""
    lat, ids = [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        _, i = index.search(q[None], K, params=params) if params is not None else index.search(q[None], K)
        lat.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
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
    """(encode(text) -> 512-d query vector, name, parts): real minilm (cache off, so every query pays the
    forward) + a random 384->512 text adapter; ``parts`` = (tower, model) for the encode-only timings."""
    try:
        import torch

        from atae.model import AlignedModel
        from atae.towers.base import TowerInfo
        from atae.towers.registry import get_text_tower

        torch.set_num_threads(1)  # one query = one thread, as one web request is served
        tt = get_text_tower("minilm", cache_size=0)
        model = AlignedModel(TowerInfo("aisfx", "audio", DIM, None, 44100), tt.info)

        def enc(text: str) -> np.ndarray:
            z = torch.from_numpy(tt.encode([text])[0])[None]
            with torch.inference_mode():
                e = model.embed_text(z, torch.ones(1, z.shape[1], dtype=torch.bool), normalize=True)
            return e[0].numpy()

        enc("warm up")
        return enc, "minilm + adapter", (tt, model)
    except Exception as exc:  # noqa: BLE001
        print(f"text tower unavailable ({exc}); text-query latency not measured", file=sys.stderr)
        return None, None, None


def bench_text_encode(parts, n: int = 60) -> dict:
    """Where a text query's time goes: the tower forward (1 vs 2 threads), the adapter, a cache hit."""
    import torch

    from atae.towers.hf_text import HFTextTower

    tt, model = parts
    out: dict = {"queries": n}
    before = torch.get_num_threads()
    lat: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for i in range(n + 2):  # 1 and 2 threads interleaved, so a load change on the machine hits both
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t, c = time.perf_counter(), time.process_time()
            tt.encode([CAPTIONS[i % len(CAPTIONS)]])
            if i >= 2:  # the first two rounds warm up each thread count
                lat[threads].append(time.perf_counter() - t)
                cpu[threads].append(time.process_time() - c)
    for threads, xs in lat.items():
        out[f"encode_{threads}thr_p50_ms"], out[f"encode_{threads}thr_p95_ms"] = pct(xs, 50), pct(xs, 95)
        out[f"encode_{threads}thr_cpu_p50_ms"] = pct(cpu[threads], 50)
    torch.set_num_threads(1)
    zs = [torch.from_numpy(tt.encode([c])[0])[None] for c in CAPTIONS]
    lat = []
    with torch.inference_mode():
        for i in range(n):
            z = zs[i % len(zs)]
            t = time.perf_counter()
            model.embed_text(z, torch.ones(1, z.shape[1], dtype=torch.bool), normalize=True)
            lat.append(time.perf_counter() - t)
    out["adapter_p50_ms"] = pct(lat, 50)
    cached = HFTextTower(tt.model_dir, layer=tt.layer)  # same weights, default LRU cache
    first = [cached.encode([c])[0] for c in CAPTIONS]
    lat = []
    for i in range(n):
        t = time.perf_counter()
        z = cached.encode([CAPTIONS[i % len(CAPTIONS)]])[0]
        lat.append(time.perf_counter() - t)
        assert np.array_equal(z, first[i % len(CAPTIONS)])
    out["encode_cache_hit_p50_ms"] = pct(lat, 50)
    torch.set_num_threads(before)
    print("text encode", {k: round(v, 3) for k, v in out.items()}, flush=True)
    return out


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


def build_hnsw(x, ids, m: int, efc: int, args) -> tuple[object | None, dict]:
    """Build in chunks so a too-slow build can stop and be extrapolated honestly from its own rate."""
    faiss.omp_set_num_threads(args.build_threads)
    n = len(x)
    index = V.new_index(DIM, "hnsw", m=m, ef_construction=efc)
    t = time.perf_counter()
    done, marks = 0, []
    chunk = max(10_000, n // 10)
    while done < n:
        index.add_with_ids(x[done : done + chunk], ids[done : done + chunk])
        done = min(n, done + chunk)
        el = time.perf_counter() - t
        marks.append((done, round(el, 2)))
        if done < n and el / done * n > args.hnsw_budget_s and el > 20:
            # the last chunk's rate (insertion slows ~log n as the graph grows), x 1.1 for what is left
            d0, e0 = marks[-2] if len(marks) > 1 else (0, 0.0)
            d1, e1 = marks[-1]
            rate = (d1 - d0) / max(e1 - e0, 1e-9)
            est = el + (n - done) / rate * 1.1
            info = {"built": False, "M": m, "efConstruction": efc, "inserted": done, "elapsed_s": el,
                    "progress": marks, "build_s_extrapolated": est,
                    "note": f"stopped: projected build > budget {args.hnsw_budget_s:.0f} s "
                    f"with {args.build_threads} threads"}
            return None, info
    return index, {"built": True, "M": m, "efConstruction": efc, "build_s": time.perf_counter() - t,
                   "progress": marks}


def hnsw_sweep(index, queries, truth) -> list[dict]:
    faiss.omp_set_num_threads(1)
    sweep = []
    for ef in EF_SWEEP:
        cpu: list[float] = []
        lat, found = time_queries(index, queries, faiss.SearchParametersHNSW(efSearch=ef), cpu=cpu)
        sweep.append({"efSearch": ef, "recall@10": recall_at_k(found, truth),
                      "search_p50_ms": pct(lat, 50), "search_p95_ms": pct(lat, 95),
                      "search_cpu_p50_ms": pct(cpu, 50)})
    return sweep


def text_query_latency(index, enc, n: int, params=None) -> dict:
    """Text query = encode (tower + adapter) + search, timed per part so the encode share is measured
    on the same queries, not from a separate run."""
    te, ts, ce, cs = [], [], [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        q = enc(CAPTIONS[i % len(CAPTIONS)])[None]
        t1, c1 = time.perf_counter(), time.process_time()
        index.search(q, K, params=params) if params is not None else index.search(q, K)
        t2, c2 = time.perf_counter(), time.process_time()
        te.append(t1 - t0)
        ts.append(t2 - t0)
        ce.append(c1 - c0)
        cs.append(c2 - c0)
    return {"text_query_p50_ms": pct(ts, 50), "text_query_p95_ms": pct(ts, 95),
            "text_query_cpu_p50_ms": pct(cs, 50), "text_encode_share": float(np.sum(te) / np.sum(ts)),
            "text_encode_share_cpu": float(np.sum(ce) / max(np.sum(cs), 1e-12))}


def bench_size(n: int, args, rng, centres, enc) -> dict:
    print(f"\n== {n:,} vectors", flush=True)
    t = time.perf_counter()
    x = clustered(n, rng, centres)
    ids = np.arange(1, n + 1, dtype=np.int64)
    queries = clustered(args.queries, rng, centres)
    print(f"generated in {time.perf_counter() - t:.1f} s", flush=True)
    res: dict = {"n": n}
    n_text = min(args.queries, 50)

    faiss.omp_set_num_threads(args.build_threads)
    flat = V.new_index(DIM, "flat")
    t = time.perf_counter()
    flat.add_with_ids(x, ids)
    res["flat"] = {"build_s": time.perf_counter() - t, "bytes_per_item": saved_bytes(flat) / n}
    faiss.omp_set_num_threads(1)
    cpu: list[float] = []
    lat, truth = time_queries(flat, queries, cpu=cpu)
    res["flat"].update({"search_p50_ms": pct(lat, 50), "search_p95_ms": pct(lat, 95),
                        "search_cpu_p50_ms": pct(cpu, 50)})
    if enc is not None:
        res["flat"].update(text_query_latency(flat, enc, n_text))
    print("flat", {k: round(v, 3) for k, v in res["flat"].items()}, flush=True)

    grid = [(V.HNSW_M, V.HNSW_EF_CONSTRUCTION)] + [g for g in args.hnsw_grid if g != (V.HNSW_M,
                                                                                      V.HNSW_EF_CONSTRUCTION)]
    res["hnsw_grid"] = []
    for gi, (m, efc) in enumerate(grid):
        index, info = build_hnsw(x, ids, m, efc, args)
        if index is not None:
            info["bytes_per_item"] = saved_bytes(index) / n
            info["sweep"] = hnsw_sweep(index, queries, truth)
        print(f"hnsw M={m} efC={efc}", {k: v for k, v in info.items() if k not in ("sweep", "progress")},
              flush=True)
        for row in info.get("sweep", []):
            print("   ", {k: round(v, 4) for k, v in row.items()}, flush=True)
        if gi > 0:
            res["hnsw_grid"].append(info)
            continue
        res["hnsw"] = info
        if index is None:
            continue
        sweep = info["sweep"]
        default = next((s for s in sweep if s["efSearch"] == V.HNSW_EF_SEARCH), None)
        if default is None:  # the default is not in the sweep: measure it
            default = hnsw_sweep_one(index, queries, truth, V.HNSW_EF_SEARCH)
        ok = [s for s in sweep if s["recall@10"] >= 0.98]
        info.update({"efSearch": V.HNSW_EF_SEARCH, "recall@10": default["recall@10"],
                     "search_p50_ms": default["search_p50_ms"], "search_p95_ms": default["search_p95_ms"],
                     "search_cpu_p50_ms": default["search_cpu_p50_ms"],
                     "min_efSearch_recall_0.98": ok[0]["efSearch"] if ok else None})
        if enc is not None:
            info.update(text_query_latency(index, enc, n_text,
                                           faiss.SearchParametersHNSW(efSearch=V.HNSW_EF_SEARCH)))
        del index
    res["ratios"] = ratios(res)
    print("ratios", {k: round(v, 3) for k, v in res["ratios"].items()}, flush=True)
    return res


def hnsw_sweep_one(index, queries, truth, ef: int) -> dict:
    faiss.omp_set_num_threads(1)
    cpu: list[float] = []
    lat, found = time_queries(index, queries, faiss.SearchParametersHNSW(efSearch=ef), cpu=cpu)
    return {"efSearch": ef, "recall@10": recall_at_k(found, truth), "search_p50_ms": pct(lat, 50),
            "search_p95_ms": pct(lat, 95), "search_cpu_p50_ms": pct(cpu, 50)}


def ratios(res: dict) -> dict:
    """exact / HNSW search p50 (speed-up), and the share of a text query's time spent encoding the text."""
    out = {}
    h, f = res.get("hnsw", {}), res["flat"]
    if h.get("search_p50_ms"):
        out["flat_over_hnsw_search_p50"] = f["search_p50_ms"] / h["search_p50_ms"]
        out["flat_over_hnsw_search_cpu_p50"] = f["search_cpu_p50_ms"] / max(h["search_cpu_p50_ms"], 1e-6)
    for kind, r in (("flat", f), ("hnsw", h)):
        if "text_encode_share" in r:
            out[f"{kind}_text_encode_share"] = r["text_encode_share"]
            out[f"{kind}_text_encode_share_cpu"] = r["text_encode_share_cpu"]
    return out


def bench_product_search(n: int, rng, centres, queries: int = 50, index: str = "auto") -> dict | None:
    """``Library.search(text)`` end to end (validation, minilm, adapter, FAISS (``index``: auto = what the
    library picks for ``n``, HNSW above ``vectors.HNSW_THRESHOLD``), SQLite lookups of
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
            Path(d) / "lib", create=True, audio_tower=Fake512(), text_tower=tt, model=model, index=index
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
        kind = lib.index.kind
        lib.search("warm up", k=10)
        lat, cpu = [], []
        for i in range(queries):
            t, c = time.perf_counter(), time.process_time()
            lib.search(CAPTIONS[i % len(CAPTIONS)] + f" {i}", k=10)
            lat.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rep = []  # the same queries again: the text tower's LRU cache answers the encode
        for i in range(queries):
            t = time.perf_counter()
            lib.search(CAPTIONS[i % len(CAPTIONS)] + f" {i}", k=10)
            rep.append(time.perf_counter() - t)
        db_mb = (Path(d) / "lib" / "library.sqlite").stat().st_size / 1e6
        lib.close()
    out = {
        "n": n,
        "index": index,
        "index_kind": kind,
        "sqlite_insert_s": insert_s,
        "embed_and_build_s": embed_s,
        "sqlite_mb": db_mb,
        "search_p50_ms": pct(lat, 50),
        "search_p95_ms": pct(lat, 95),
        "search_cpu_p50_ms": pct(cpu, 50),
        "repeated_query_p50_ms": pct(rep, 50),
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
        if all("search_cpu_p50_ms" in p[1] for p in pts):
            ax.plot(ns, [p[1]["search_cpu_p50_ms"] for p in pts], style[0] + ":", color=color,
                    label=f"{kind}: search CPU-time p50")
        if all("text_query_cpu_p50_ms" in p[1] for p in pts):
            ax.plot(ns, [p[1]["text_query_cpu_p50_ms"] for p in pts], style[0] + "-.", color=color, alpha=0.6,
                    label=f"{kind}: text query CPU-time p50")
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


def grid_arg(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(m), int(e)) for m, e in (g.split(":") for g in text.split(",") if g.strip())]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hnsw-grid wants M:efConstruction,... ({exc})") from exc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma list; add 1000000 for the (slow) 1M run")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hnsw-budget-s", type=float, default=900.0)
    ap.add_argument("--hnsw-grid", type=grid_arg, default=[], help="extra HNSW builds, e.g. 16:40,24:48")
    ap.add_argument("--audio-clips", type=int, default=60)
    ap.add_argument("--product-n", type=int, default=100_000, help="Library.search end-to-end size.")
    ap.add_argument("--product-index", default="auto", choices=["auto", "flat", "hnsw"])
    ap.add_argument("--skip-product", action="store_true", help="Skip the Library.search end-to-end run.")
    ap.add_argument("--skip-indexing", action="store_true", help="Skip indexing real audio from ../shared.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "library.json"))
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from an existing --out JSON.")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text())["sizes"], Path(args.out).with_name("library_latency.png"))
        return
    path = Path(args.out)
    previous = json.loads(path.read_text()) if path.is_file() else {}

    def kept(key: str):
        """A skipped section keeps the previous run's numbers, marked as such."""
        old = previous.get(key)
        return None if old is None else {**old, "from_previous_run": True}

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, DIM), dtype=np.float32) / np.sqrt(DIM)
    enc, enc_name, parts = text_encoder()
    text = bench_text_encode(parts) if parts is not None else None
    results = [bench_size(int(n), args, rng, centres, enc) for n in args.sizes.split(",")]
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "load_avg_at_end": os.getloadavg(),
            "note": "2 shared cores; other jobs were running, so absolute numbers are pessimistic",
        },
        "dim": DIM,
        "k": K,
        "queries": args.queries,
        "vectors": "synthetic: Gaussian mixture of 2,000 unit centres, noise norm ~0.7, renormalised",
        "defaults": {"M": V.HNSW_M, "efConstruction": V.HNSW_EF_CONSTRUCTION, "efSearch": V.HNSW_EF_SEARCH,
                     "hnsw_threshold": V.HNSW_THRESHOLD},
        "text_encoder": enc_name,
        "text_encode": text,
        "build_threads": args.build_threads,
        "sizes": results,
        "product_search": kept("product_search") if args.skip_product
        else bench_product_search(args.product_n, rng, centres, index=args.product_index),
        "indexing": kept("indexing") if args.skip_indexing else bench_indexing(args.audio_clips),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    plot(results, path.with_name("library_latency.png"))
    print(f"\nwrote {path} and {path.with_name('library_latency.png')}")


if __name__ == "__main__":
    main()
