"""Benchmark (not a test): adapter training and scoring at Clotho scale on synthetic cached embeddings.

Shapes are the seed's: 3,839 training clips x 5 captions; audio 2048-d x 1 element (CNN14 whole-clip);
text 768-d x ~20 tokens (distilroberta, lengths 12..28). Validation is Clotho-sized (1,045 clips x 5).

Reports, in one run on this CPU:
* seconds per training epoch (the real ``train_stage`` loop: batches, loss, Adam, validation, checkpoint)
  and its parts (training steps, validation);
* achieved FLOP/s of the training steps (matrix products counted analytically from the real row counts)
  as a fraction of a plain GEMM of the same size (the per-batch text fc1 product) timed in the same run;
* the time to score 5,225 queries x 1,045 clips (``score_matrix``) and to turn that into DCASE metrics
  and top-10 lists (``evaluate_scores``).

Usage: python bench/bench_train.py [--threads 1] [--out bench/results/train.json]
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
import torch

N_TRAIN, N_VAL, CAPS = 3839, 1045, 5
FA, FT, HIDDEN, OUT = 2048, 768, 512, 512
TOK_LO, TOK_HI = 12, 28  # mean 20 tokens


def _packed(rng, n_items, dim, lo, hi):
    from atae.train import PackedSeqs

    lengths = rng.integers(lo, hi + 1, size=n_items) if hi > lo else np.full(n_items, lo)
    data = rng.standard_normal((int(lengths.sum()), dim), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return PackedSeqs(torch.from_numpy(data), torch.from_numpy(offsets))


class _PackedTable:
    """Minimal SequenceTable over a PackedSeqs (for score_matrix)."""

    def __init__(self, packed, info):
        self.p, self.info = packed, info
        self._pos = {f"k{i}": i for i in range(len(packed))}

    def __contains__(self, k):
        return k in self._pos

    def get(self, k):
        i = self._pos[k]
        return self.p.data[self.p.offsets[i]:self.p.offsets[i + 1]].numpy()

    def batch(self, keys):
        seqs = [self.get(k) for k in keys]
        z = np.zeros((len(seqs), max(len(s) for s in seqs), self.info.dim), np.float32)
        mask = np.zeros(z.shape[:2], bool)
        for i, s in enumerate(seqs):
            z[i, :len(s)], mask[i, :len(s)] = s, True
        return torch.from_numpy(z), torch.from_numpy(mask)


def gemm_flops(m, k, n, seconds_target=2.0):
    """FLOP/s of torch.mm (m x k) @ (k x n), float32, best of repeated timed blocks."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        torch.mm(a, b)
    reps, best, t_end = 10, 0.0, time.perf_counter() + seconds_target
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * m * k * n * reps / dt)
    return best


def interleaved_ratio(model, train, cfg, m_batch, rounds: int = 5, steps: int = 60) -> dict:
    """Training steps (same code path as train_stage: packed gather, adapters, seed loss, fused Adam) and
    the reference GEMM timed alternately, so both see the same load on a shared CPU."""
    from atae.losses import SeedContrastiveLoss
    from atae.train.loop import _adam

    loss_fn, opt = SeedContrastiveLoss(), _adam(list(model.parameters()), cfg)
    g = torch.Generator().manual_seed(1)
    ratios, step_flops_s, gemm_s = [], [], []
    for _ in range(rounds):
        flops, t0 = 0, time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=g)
            ga, gt = train.audio.gather(train.a_idx[idx]), train.text.gather(train.t_idx[idx])
            ea = model.audio_adapter.forward_packed(*ga)
            et = model.text_adapter.forward_packed(*gt)
            loss = loss_fn(ea, et, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            flops += (4 * ga[0].shape[0] * FA * HIDDEN + 4 * gt[0].shape[0] * FT * HIDDEN
                      + 3 * 2 * 2 * cfg.batch_size * HIDDEN * OUT)
        f = flops / (time.perf_counter() - t0)
        ref = gemm_flops(m_batch, FT, HIDDEN, seconds_target=0.5)
        ratios.append(f / ref)
        step_flops_s.append(f)
        gemm_s.append(ref)
    return {"rounds": rounds, "steps_per_round": steps,
            "achieved_gflops": [round(x / 1e9, 1) for x in step_flops_s],
            "gemm_gflops": [round(x / 1e9, 1) for x in gemm_s],
            "fraction_median": round(float(np.median(ratios)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

    from atae.evaluate import evaluate_scores, score_matrix
    from atae.losses import SeedContrastiveLoss
    from atae.model import AlignedModel
    from atae.towers.base import TowerInfo
    from atae.train import TrainConfig, TrainData, ValData, train_stage

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    a_train = _packed(rng, N_TRAIN, FA, 1, 1)
    t_train = _packed(rng, N_TRAIN * CAPS, FT, TOK_LO, TOK_HI)
    a_val = _packed(rng, N_VAL, FA, 1, 1)
    t_val = _packed(rng, N_VAL * CAPS, FT, TOK_LO, TOK_HI)
    gen_s = time.perf_counter() - t0
    pairs = torch.arange(N_TRAIN * CAPS)
    train = TrainData(a_train, t_train, pairs // CAPS, pairs, pairs // CAPS, "bench", [])
    val = ValData(a_val, t_val, np.repeat(np.arange(N_VAL), CAPS), "bench-val")
    ainfo = TowerInfo("bench-audio", "audio", FA, None, 32000, {})
    tinfo = TowerInfo("bench-text", "text", FT, None, None, {})
    torch.manual_seed(args.seed)
    model = AlignedModel(ainfo, tinfo, HIDDEN, OUT)
    cfg = TrainConfig(max_epochs=1, seed=args.seed)

    # analytic FLOPs of one epoch's training steps: fc1 forward + weight gradient (inputs need no
    # gradient) on every real row, fc2 forward + weight and input gradients on every pooled vector
    rows_a = int(len(train))  # one audio row per pair
    rows_t = int(t_train.offsets[-1])
    n = len(train)
    flops = (2 * 2 * rows_a * FA * HIDDEN + 2 * 2 * rows_t * FT * HIDDEN
             + 3 * 2 * (2 * n) * HIDDEN * OUT)

    # the CPU is shared: time the reference GEMM before and after the epoch and use the mean
    mean_rows = rows_t / (N_TRAIN * CAPS)
    m_batch = int(round(cfg.batch_size * mean_rows))
    gemm_before = gemm_flops(m_batch, FT, HIDDEN)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = train_stage(model, SeedContrastiveLoss(), train, val, cfg, d, stage_name="bench")
        epoch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_score = val.map_at_10(model)
    val_s = time.perf_counter() - t0
    steps_s = max(epoch_s - val_s, 1e-9)  # the epoch minus one validation pass (checkpoint included)

    gemm_after = gemm_flops(m_batch, FT, HIDDEN)
    gemm_batch = 0.5 * (gemm_before + gemm_after)
    gemm_big = gemm_flops(8192, FT, HIDDEN)
    achieved = flops / steps_s

    # contention-robust ratio: rounds of 60 real training steps, each followed by the reference GEMM
    inter = interleaved_ratio(model, train, cfg, m_batch)

    # scoring: 5,225 queries x 1,045 clips
    atab = _PackedTable(a_val, ainfo)
    keys = [f"k{i}" for i in range(N_VAL)]
    seqs = [t_val.data[t_val.offsets[i]:t_val.offsets[i + 1]].numpy() for i in range(N_VAL * CAPS)]
    t0 = time.perf_counter()
    scores = score_matrix(model, atab, keys, seqs)
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate_scores(scores, [int(x) for x in val.relevant],
                         queries=[f"q{i}" for i in range(len(seqs))], candidates=keys)
    metrics_s = time.perf_counter() - t0

    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": sys.version.split()[0]},
        "shapes": {"train_clips": N_TRAIN, "captions_per_clip": CAPS, "train_pairs": n, "audio_dim": FA,
                   "text_dim": FT, "text_tokens_mean": round(mean_rows, 2), "text_rows": rows_t,
                   "val_clips": N_VAL, "val_queries": N_VAL * CAPS, "batch_size": cfg.batch_size,
                   "hidden": HIDDEN, "out_dim": OUT},
        "synthetic_data_seconds": round(gen_s, 2),
        "epoch_seconds": round(epoch_s, 3),
        "epoch_parts_seconds": {"train_steps_and_checkpoint": round(steps_s, 3),
                                "validation": round(val_s, 3)},
        "train_flops_per_epoch": flops,
        "achieved_gflops": round(achieved / 1e9, 2),
        "gemm_same_size": {"shape": [m_batch, FT, HIDDEN], "gflops": round(gemm_batch / 1e9, 2),
                           "gflops_before_after": [round(gemm_before / 1e9, 2), round(gemm_after / 1e9, 2)]},
        "gemm_large": {"shape": [8192, FT, HIDDEN], "gflops": round(gemm_big / 1e9, 2)},
        "fraction_of_gemm_same_size": round(achieved / gemm_batch, 3),
        "fraction_of_gemm_large": round(achieved / gemm_big, 3),
        "interleaved": inter,
        "score_5225x1045_seconds": round(score_s, 3),
        "metrics_and_top10_seconds": round(metrics_s, 3),
        "sanity": {"train_loss": res.history[0]["train_loss"], "val_mAP@10_random_data": val_score,
                   "mAP@10_eval": ev.metrics["mAP@10"]["value"], "chance_mAP@10": float(
                       sum(1 / r for r in range(1, 11)) / N_VAL)},
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
