"""Bridge and hybrid search in a 100k-segment library over HNSW: end-to-end latency, and the recall of the
candidate rules of ``atae.library.search`` against the dense computation (which chose their lengths).

The library is real (``atae.library.Library``: SQLite + FAISS HNSW, the real MiniLM text tower, an
``AlignedModel``), built in a temp folder from rows written straight into its database:

* tags: real EfficientAT mn04 tags of ../shared audio (ESC-50 folds 1-4 and the 43 AudioCaps clips),
  expanded to N segments by mixing two clips' tags (``a t_i + (1 - a) t_j``, a uniform); without
  ../shared, synthetic topic tags (64 sparse topics);
* raw tower vectors (384-d, like mn04's): a fixed random linear map of the segment's sqrt-tags plus noise,
  so the model's audio vectors and the tags describe the same sounds, as a tower's embedding and its own
  tag head do; the model's adapters are untrained (random, seeded): timing does not depend on training.
  The model carries a full-size caption reference for the hybrid's novelty gate, which every query passes.

**End to end**: a new query text on every call (words drawn from sound captions, never repeated), through
``Library.search(text, k=10, scorer=...)``: the text tower, the scorer, the segment rows from SQLite.
The three scorers are interleaved call by call, so a change of load on the machine hits each alike, with a
fourth: the hybrid for queries its novelty gate sends to the bridge alone (a query unlike every training
caption; the other hybrid calls all pass the gate). Each call is timed by the wall clock and by the
thread's CPU time (the same single-threaded work on an idle machine; on a shared one the CPU time is the
steadier of the two). Torch, BLAS and FAISS use one thread, as one web request is served.

**Recall** (scoring only, no text tower): for each query, the dense hybrid / bridge over every segment
(``HybridScorer.score`` / ``BridgeScorer.score``) against the candidate rule with several list lengths.
Queries: AudioCaps captions (or generated texts), each with a query vector made from the tags of the
caption's own clip (``agree``: both sides want the same sound) or of another random clip
(``independent``: the sides disagree, the hard case for candidate lists).

    python bench/bench_hybrid.py [--segments 100000] [--queries 60] [--out bench/results/hybrid.json]
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

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shared_data  # noqa: E402

RAW_DIM = 384
WORDS = ("dog barks rain falls on a tin roof car engine idles door slams birds chirp wind blows crowd "
         "cheers water drips glass breaks bell rings baby cries thunder rumbles footsteps on gravel siren "
         "wails keyboard clicks train passes fire crackles cat meows church organ plays violin man speaks "
         "woman laughs while loudly softly in the distance nearby").split()


class FixedTower:
    """Stands for the audio tower whose rows the benchmark writes (the tower itself never runs)."""

    name, sample_rate, has_tags = "efficientat-mn04", 32000, True

    @property
    def info(self):
        from atae.towers.base import TowerInfo

        return TowerInfo("efficientat-mn04", "audio", RAW_DIM, "bench-fixed", 32000, {})


def source_tags(rng) -> tuple[np.ndarray, list[list[str]], str]:
    """(real clip tags (n0, 527), captions of the last clips or [], description)."""
    shared = shared_data.shared_root()
    if shared is None:
        topics = (rng.random((64, 527)) ** 8).astype(np.float32)
        mix = rng.dirichlet(np.full(64, 0.1), size=2000).astype(np.float32)
        return np.clip(mix @ topics + 0.01 * rng.random((2000, 527)), 0, 1), [], "synthetic topics"
    esc_files, _, _ = shared_data.esc50(shared)
    ac_files, captions = shared_data.audiocaps(shared)
    tags = shared_data.whole_clip_tags(esc_files + ac_files, shared)
    return tags, captions, "mn04 tags of ESC-50 folds 1-4 + 43 AudioCaps clips (mixed in pairs)"


def build(root: Path, n: int, rng):
    """A library of n one-segment files (rows written directly), its model, the map tags -> raw."""
    import torch

    from atae.library import Library
    from atae.library.db import SegmentIn
    from atae.model import AlignedModel
    from atae.scoring import EXTRA_HYBRID_GATE, EXTRA_HYBRID_WEIGHT
    from atae.towers.registry import get_text_tower
    from atae.train.runner import MAX_REFERENCE

    src, captions, what = source_tags(rng)
    i, j = rng.integers(0, len(src), n), rng.integers(0, len(src), n)
    a = rng.random((n, 1), dtype=np.float32)
    tags = np.clip(a * src[i] + (1 - a) * src[j], 0, 1).astype(np.float32)
    proj = rng.standard_normal((527, RAW_DIM)).astype(np.float32) / np.sqrt(527)

    def raw_of(t):
        r = np.sqrt(t) @ proj
        return r + 0.1 * np.linalg.norm(r, axis=-1, keepdims=True) * rng.standard_normal(r.shape) / np.sqrt(
            RAW_DIM)

    torch.manual_seed(0)
    model = AlignedModel(FixedTower().info, get_text_tower("minilm").info)
    model.eval()
    # a trained model's fusion: a full caption reference for the novelty gate, which every query passes
    # (the hybrid's whole path is timed)
    ref = rng.standard_normal((MAX_REFERENCE, model.out_dim)).astype(np.float32)
    model.caption_reference = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    model.extras = {EXTRA_HYBRID_WEIGHT: 0.5, EXTRA_HYBRID_GATE: -1.0}
    raw = raw_of(tags).astype(np.float32)
    lib = Library.open(root, create=True, audio_tower=FixedTower(), model=model)
    t0 = time.perf_counter()
    for a0 in range(0, n, 5000):
        with lib.db.transaction():
            for k in range(a0, min(a0 + 5000, n)):
                lib.db.put_file(path=f"/bench/{k:07d}.wav", size=1, mtime_ns=1, hash=None, duration=5.0,
                                sample_rate=32000, channels=1, encoder="bench", model_version=None,
                                status="ok", error=None,
                                segments=[SegmentIn(0.0, 5.0, raw[k][None], tags[k])])
    lib.close()
    lib = Library.open(root, model=model)  # builds the FAISS index from the rows (HNSW above 50k)
    return lib, model, tags, src, captions, raw_of, what, time.perf_counter() - t0


class Texts:
    """Fresh query texts: 7 caption words, never the same text twice."""

    def __init__(self, seed: int):
        self.rng, self.seen = np.random.default_rng(seed), set()

    def __call__(self) -> str:
        while True:
            t = " ".join(self.rng.choice(WORDS, 7))
            if t not in self.seen:
                self.seen.add(t)
                return t


GATED = "hybrid, gated to the bridge"


def end_to_end(lib, model, n_q: int, seed: int) -> dict:
    from atae.scoring import EXTRA_HYBRID_GATE

    texts = Texts(seed)
    names = ("adapter", "bridge", "hybrid", GATED)
    for name in names[:3]:  # build the shared search state, label embeddings and caches outside the timings
        lib.search(texts(), k=10, scorer=name)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    passing = model.extras[EXTRA_HYBRID_GATE]
    for i in range(n_q):
        for name in names[i % 4:] + names[:i % 4]:
            text = texts()
            # GATED: a threshold no query reaches, as for a query unlike every training caption
            model.extras[EXTRA_HYBRID_GATE] = 2.0 if name == GATED else passing
            t0, c0 = time.perf_counter(), time.thread_time()
            lib.search(text, k=10, scorer="hybrid" if name == GATED else name)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    model.extras[EXTRA_HYBRID_GATE] = passing
    out = {}
    for n in names:
        out[n] = {"p50_ms": 1e3 * float(np.median(wall[n])),
                  "p95_ms": 1e3 * float(np.percentile(wall[n], 95)),
                  "p50_over_adapter": float(np.median(wall[n]) / np.median(wall["adapter"])),
                  "cpu_p50_ms": 1e3 * float(np.median(cpu[n])),
                  "cpu_p50_over_adapter": float(np.median(cpu[n]) / np.median(cpu["adapter"]))}
    return out


def recall_sweep(lib, model, src, captions, raw_of, n_q: int, seed: int) -> dict:
    from atae.library import scorers, search
    from atae.scoring import Fusion

    rng = np.random.default_rng(seed)
    st = lib.search_state()
    tb = lib.tag_bridge
    texts = [c for caps in captions for c in caps] or [Texts(seed)() for _ in range(n_q)]
    clip_of = [k for k, caps in enumerate(captions) for _ in caps] or list(rng.integers(0, len(src), n_q))
    offset = len(src) - len(captions) if captions else 0  # AudioCaps clips are the last rows of src
    pick = rng.choice(len(texts), min(n_q, len(texts)), replace=False)
    lists = ((128, 256, 128), (128, 256, 256), (256, 256, 256), (64, 512, 64), (128, 512, 128),
             (128, 512, 256), (256, 512, 256), (256, 512, 512), (256, 1024, 256), (512, 512, 512),
             (512, 1024, 512))  # (graph, bridge, HNSW efSearch)
    out: dict = {"queries": int(len(pick)), "hybrid": {}, "bridge": {}}
    w = Fusion.of(model).weight
    for case in ("agree", "independent"):
        rec = {m: {"r10": [], "r64": [], "ms": []} for m in lists}
        for qi in pick:
            sentence = tb.sentences([texts[qi]])
            dist = tb.distribution(sentence)[0]
            clip = offset + clip_of[qi] if case == "agree" else int(rng.integers(0, len(src)))
            q = model.encode_audio([raw_of(src[clip])[None].astype(np.float32)])[0]
            a = lib.index.scores_at(q, st.rows)
            dense = scorers.scoring.hybrid_scores(a[None], st.bridge_at(None, dist)[None], w)[0]
            want = np.lexsort((np.arange(len(dense)), -dense))[:64]
            for m in lists:
                t0 = time.perf_counter()
                pos, _ = st.hybrid_top(q, dist, w, 64, graph=m[0], bridge=m[1], ef_search=m[2])
                rec[m]["ms"].append(1e3 * (time.perf_counter() - t0))
                rec[m]["r10"].append(len(set(pos[:10]) & set(want[:10])) / 10)
                rec[m]["r64"].append(len(set(pos) & set(want)) / 64)
        out["hybrid"][case] = {f"graph {m[0]} (efSearch {m[2]}), bridge {m[1]}": {
            k: float(np.mean(v)) if k != "ms" else float(np.median(v)) for k, v in r.items()}
            for m, r in rec.items()}
    # the bridge's candidates: labels read x candidates rescored, against every segment scored
    # (by hand here, as SearchState.bridge_candidates does, so every combination can be timed)
    dists = [tb.distribution(tb.sentences([texts[qi]]))[0] for qi in pick]
    for labels in (4, 8, 16, 32):
        for m in (256, 1024, 4096):
            r10, r64, ms = [], [], []
            for d in dists:
                exact = st.bridge_at(None, d)
                want = np.lexsort((np.arange(len(exact)), -exact))[:64]
                t0 = time.perf_counter()
                partial = np.zeros(len(st), np.float32)
                for lab in np.argpartition(-d, labels)[:labels]:
                    partial += d[lab] * st.by_label[lab]
                cand = np.argpartition(-partial, m)[:m]
                got = cand[np.lexsort((cand, -st.bridge_at(cand, d)))][:64]
                ms.append(1e3 * (time.perf_counter() - t0))
                r10.append(len(set(got[:10]) & set(want[:10])) / 10)
                r64.append(len(set(got) & set(want)) / 64)
            out["bridge"][f"{labels} labels, {m} candidates"] = {
                "r10": float(np.mean(r10)), "r64": float(np.mean(r64)), "ms": float(np.median(ms))}
    out["shipped"] = {"BRIDGE_LABELS": search.BRIDGE_LABELS, "BRIDGE_CANDIDATES": search.BRIDGE_CANDIDATES,
                      "HYBRID_CANDIDATES": search.HYBRID_CANDIDATES,
                      "HYBRID_EF_SEARCH": search.HYBRID_EF_SEARCH, "DENSE_LIMIT": search.DENSE_LIMIT}
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "hybrid.json")
    args = ap.parse_args(argv)
    import faiss
    import torch

    torch.set_num_threads(1)  # one query = one thread, as one web request is served
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as d:
        lib, model, tags, src, captions, raw_of, what, build_s = build(Path(d) / "lib", args.segments, rng)
        faiss.omp_set_num_threads(1)
        t0 = time.perf_counter()
        lib.search_state()
        state_s = time.perf_counter() - t0
        print(f"library: {args.segments} segments ({what}), index {lib.index.kind}, built in "
              f"{build_s:.0f} s; search state {state_s:.1f} s", flush=True)
        e2e = end_to_end(lib, model, args.queries, args.seed)
        for name, r in e2e.items():
            print(f"  end to end {name:27s} p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  "
                  f"{r['p50_over_adapter']:.2f}x the adapter; CPU p50 {r['cpu_p50_ms']:6.1f} ms  "
                  f"{r['cpu_p50_over_adapter']:.2f}x", flush=True)
        rec = recall_sweep(lib, model, src, captions, raw_of, args.queries, args.seed)
        for case, rows in rec["hybrid"].items():
            for m, r in rows.items():
                print(f"  hybrid {case:11s} {m:38s}: recall@10 {r['r10']:.3f} @64 {r['r64']:.3f}, "
                      f"{r['ms']:.2f} ms", flush=True)
        for name, r in rec["bridge"].items():
            print(f"  bridge {name:26s}: recall@10 {r['r10']:.3f} @64 {r['r64']:.3f}, {r['ms']:.2f} ms",
                  flush=True)
        lib.close()
    result = {"segments": args.segments, "data": what, "index": "hnsw" if args.segments > 50_000 else "flat",
              "build_seconds": build_s, "search_state_seconds": state_s, "end_to_end": e2e, "recall": rec,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
