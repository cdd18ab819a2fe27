"""Audio-tower extraction throughput, and CNN14 against the simple way of running it.

    python bench/bench_towers.py [--threads 2] [--reps 3] [--variants] [--esc50] [--json OUT]

Every available audio tower encodes the same 60 s of audio (three 20 s clips, Clotho-like lengths,
deterministic synthetic sound) in whole-clip mode; throughput is audio seconds per wall second (best of
``--reps``). CNN14 runs with the real checkpoint if it resolves, else random weights (same speed);
EfficientAT mn04 with the real weights from the registry or ``../shared``; aiSFX if its package is
installed. The CNN14 reference is the same network run the simple way: the official-layout module,
batch 1, float32, autograd on (no ``inference_mode``/``no_grad``); a ``no_grad`` run is reported too.
``--variants`` also times channels_last and bf16 autocast for CNN14 (with their max output deviation),
``--esc50`` measures EfficientAT's embedding choice (leave-one-out 1-NN on ESC-50, needs ../shared).
Writes ``bench/results/towers.json``. Timings on a shared machine are noisy: the load average is
recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLOTHO_CLIPS, CLOTHO_HOURS = 6929, 45.0  # development+validation+evaluation, about 45 h of audio


def shared_root() -> Path | None:
    env = os.environ.get("ATAE_SHARED")
    cand = Path(env) if env else HERE.parent.parent / "shared"
    return cand if cand.is_dir() else None


def synthetic_clips(sr: int, seconds=(20.0, 20.0, 20.0), seed: int = 0) -> list[np.ndarray]:
    """Three clips: tones + noise bursts + silence, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        n = int(s * sr)
        t = np.arange(n) / sr
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
        x[: n // 10] = 0.0
        out.append(x.astype(np.float32))
    return out


def best_time(fn, reps: int, cpu: list | None = None) -> float:
    """Best wall time of ``reps`` runs; ``cpu`` (if given) receives the best CPU (process) time."""
    fn()  # warm-up (allocator, oneDNN primitive cache)
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    if cpu is not None:
        cpu.append(min(cs))
    return min(ts)


def tower_throughput(name: str, tower, reps: int) -> dict:
    clips = synthetic_clips(tower.sample_rate)
    audio_s = sum(len(c) for c in clips) / tower.sample_rate
    cpu: list = []
    wall = best_time(lambda: tower.encode_many(clips), reps, cpu)
    # On a shared machine wall time includes waiting for other processes; CPU seconds do not, so
    # audio_s / cpu_s * n_cores estimates the throughput of the same cores when they are not shared.
    return {"tower": name, "audio_s": audio_s, "wall_s": wall, "cpu_s": cpu[0], "x_realtime": audio_s / wall,
            "clotho_projection_h": CLOTHO_HOURS / (audio_s / wall),
            "x_realtime_per_cpu_s": audio_s / cpu[0],
            "weights": "real" if getattr(tower, "weights_path", None) else "random/formula"}


def cnn14_reference(reps: int, variants: bool) -> dict:
    import torch

    from atae.towers import cnn14 as C

    clips = synthetic_clips(C.SAMPLE_RATE)
    audio_s = sum(len(c) for c in clips) / C.SAMPLE_RATE
    net = C.Cnn14().eval()  # random weights: same cost as the real ones

    def simple():  # the simple way: one clip at a time, float32, autograd recording
        return [net(torch.from_numpy(c)[None])["embedding"] for c in clips]

    def no_grad():
        with torch.no_grad():
            return simple()

    tower = C.Cnn14Tower({k: v.clone() for k, v in net.state_dict().items()})
    res = {"simple_wall_s": best_time(simple, reps), "no_grad_wall_s": best_time(no_grad, reps),
           "atae_wall_s": best_time(lambda: tower.encode_many(clips), reps), "audio_s": audio_s}
    with torch.no_grad():
        ref = [net(torch.from_numpy(c)[None])["embedding"][0].numpy() for c in clips]
    got = tower.encode_many(clips)
    res["atae_max_abs_diff"] = float(max(np.abs(g.seq[0] - r).max() for g, r in zip(got, ref, strict=True)))
    if variants:
        cl = C.Cnn14.from_state_dict(net.state_dict())
        fast_cl = C.FastCnn14(cl).to(memory_format=torch.channels_last).eval()

        def run_cl():
            with torch.inference_mode():
                return [fast_cl(torch.from_numpy(c)[None])["embedding"] for c in clips]

        def run_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return [tower.fast(torch.from_numpy(c)[None])["embedding"].float() for c in clips]

        for name, fn in (("channels_last", run_cl), ("bf16_autocast", run_bf16)):
            out = fn()
            res[f"{name}_wall_s"] = best_time(fn, reps)
            res[f"{name}_max_abs_diff"] = float(max((o[0].numpy() - r).__abs__().max()
                                                    for o, r in zip(out, ref, strict=True)))
    res["speedup_vs_simple"] = res["simple_wall_s"] / res["atae_wall_s"]
    res["speedup_vs_no_grad"] = res["no_grad_wall_s"] / res["atae_wall_s"]
    return res


def esc50_probe(root: Path) -> dict:
    """Leave-one-out 1-NN cosine accuracy of EfficientAT mn04 'features' vs 'mlp_hidden' on ESC-50."""
    import soundfile as sf
    import soxr

    from atae.towers.efficientat import EfficientATTower

    tower = EfficientATTower(root / "data/weights/efficientat_mn04/mn04_as_mAP_432.pt")

    def run(files):
        feats, hid, labels = [], [], []
        for f in files:
            x, sr = sf.read(f, dtype="float32")
            x = x.mean(axis=1) if x.ndim > 1 else x
            out = tower.run_batch(tower.pad_to_min(soxr.resample(x, sr, 32000).astype(np.float32))[None])
            feats.append(out["features"][0])
            hid.append(out["mlp_hidden"][0])
            labels.append(int(f.stem.split("-")[-1]))
        labels = np.asarray(labels)

        def loo(x):
            x = np.asarray(x)
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            s = x @ x.T
            np.fill_diagonal(s, -np.inf)
            return float((labels[s.argmax(1)] == labels).mean())

        return {"n": len(files), "features": loo(feats), "mlp_hidden": loo(hid)}

    esc = root / "data" / "esc50"
    return {"fold4_16k": run(sorted((esc / "audio_16k").glob("4-*"))),
            "fold4_44k": run(sorted((esc / "audio_44k").glob("4-*")))}


def by_name(results: dict, name: str) -> float:
    return next(r["x_realtime"] for r in results["towers"] if r["tower"] == name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--esc50", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "towers.json")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(args.threads)
    from atae import weights as W
    from atae.errors import AtaeError
    from atae.towers.registry import get_audio_tower

    results: dict = {"threads": args.threads, "torch": torch.__version__, "load_avg_start": os.getloadavg(),
                     "towers": []}
    root = shared_root()
    # CNN14: real weights when present, else random (identical cost)
    from atae.towers.cnn14 import Cnn14, Cnn14Tower

    try:
        cnn = Cnn14Tower()
    except AtaeError:
        cnn = Cnn14Tower({k: v.clone() for k, v in Cnn14().state_dict().items()})
    towers = [("cnn14", cnn)]
    mn_weights = None
    if W.is_available("efficientat-mn04"):
        mn_weights = W.resolve("efficientat-mn04")
    elif root and (root / "data/weights/efficientat_mn04/mn04_as_mAP_432.pt").is_file():
        mn_weights = root / "data/weights/efficientat_mn04/mn04_as_mAP_432.pt"
    if mn_weights is not None:
        towers.append(("efficientat-mn04", get_audio_tower("efficientat-mn04", mn_weights)))
    try:
        towers.append(("aisfx", get_audio_tower("aisfx")))
    except (AtaeError, ImportError) as e:
        print(f"aisfx skipped: {e}", file=sys.stderr)
    for name, tower in towers:
        r = tower_throughput(name, tower, args.reps)
        results["towers"].append(r)
        dedicated = r["x_realtime_per_cpu_s"] * args.threads
        r["clotho_projection_dedicated_h"] = CLOTHO_HOURS / dedicated
        print(f"{name:18s} {r['x_realtime']:7.1f}x real time ({r['weights']} weights): Clotho 45 h -> "
              f"{r['clotho_projection_h']:.2f} h; {r['x_realtime_per_cpu_s']:.1f} audio s per CPU s -> "
              f"{r['clotho_projection_dedicated_h']:.2f} h on {args.threads} unshared cores")
    if args.threads > 1:  # does intra-op threading pay, or would one process per core do better?
        torch.set_num_threads(1)
        one = tower_throughput("cnn14", cnn, args.reps)["x_realtime"]
        torch.set_num_threads(args.threads)
        results["cnn14_x_realtime_1_thread"] = one
        print(f"cnn14 at 1 thread: {one:.1f}x real time ({by_name(results, 'cnn14') / one:.2f}x gain from "
              f"{args.threads} threads)")
    ref = cnn14_reference(args.reps, args.variants)
    results["cnn14_reference"] = ref
    print(f"cnn14 atae vs simple (batch 1, fp32, autograd on): {ref['speedup_vs_simple']:.2f}x; "
          f"vs no_grad: {ref['speedup_vs_no_grad']:.2f}x; max |d embedding| {ref['atae_max_abs_diff']:.2e}")
    for k in ("channels_last", "bf16_autocast"):
        if f"{k}_wall_s" in ref:
            print(f"  {k}: {ref['atae_wall_s'] / ref[f'{k}_wall_s']:.2f}x of atae, max |d| "
                  f"{ref[f'{k}_max_abs_diff']:.2e}")
    by = {r["tower"]: r for r in results["towers"]}
    for other in ("efficientat-mn04", "aisfx"):
        if other in by:
            ratio = by[other]["x_realtime"] / by["cnn14"]["x_realtime"]
            results[f"{other}_vs_cnn14_speed"] = ratio
            print(f"{other} / cnn14 speed: {ratio:.1f}x")
    if args.esc50 and root is not None:
        results["esc50_loo_1nn_mn04"] = esc50_probe(root)
        print("ESC-50 leave-one-out 1-NN (mn04):", json.dumps(results["esc50_loo_1nn_mn04"]))
    results["load_avg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, args.json)
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
