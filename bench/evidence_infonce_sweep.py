"""Choosing the InfoNCE recipe's defaults on VALIDATION data only (ESC-50 fold 3), never on the test fold.

Each variant trains the ``atae-infonce`` recipe (mn04 + MiniLM features) on ESC-50 folds 1-2 with early
stopping on fold 3 (the seed's caption mAP@10), as bench/evidence.py's main protocol, and is scored on
fold-3 class queries (mAP@10, R@1, R@10) and fold-3 caption mAP@10. Fold 4 is never loaded here, so a
default picked from this table cannot have looked at the test fold. Writes
bench/results/evidence_infonce_sweep.json (merged with earlier variants) and prints a table.

    python bench/evidence_infonce_sweep.py [--variants base,t0.03,...] [--seeds 3] [--patience 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import evidence as ev  # noqa: E402

# the recipe before this sweep (initial T 0.07, learnable); every variant spells its loss out in full
IN = {"name": "infonce", "temperature": 0.07, "learnable": True, "multi_positive": True}
# variant -> train overrides of the atae-infonce recipe
VARIANTS = {
    "base": {"loss_params": IN},
    "t0.03": {"loss_params": {**IN, "temperature": 0.03}},
    "t0.05": {"loss_params": {**IN, "temperature": 0.05}},
    "t0.1": {"loss_params": {**IN, "temperature": 0.1}},
    "t0.2": {"loss_params": {**IN, "temperature": 0.2}},
    "t0.3": {"loss_params": {**IN, "temperature": 0.3}},
    "t0.5": {"loss_params": {**IN, "temperature": 0.5}},
    "t0.2-fixed": {"loss_params": {**IN, "temperature": 0.2, "learnable": False}},
    "t0.3-fixed": {"loss_params": {**IN, "temperature": 0.3, "learnable": False}},
    "t0.2-bs64": {"batch_size": 64, "loss_params": {**IN, "temperature": 0.2}},
    "t0.2-lr5e-4": {"lr": 5e-4, "loss_params": {**IN, "temperature": 0.2}},
    "fixed0.07": {"loss_params": {**IN, "learnable": False}},
    "single-positive": {"loss_params": {**IN, "multi_positive": False}},
    "lr5e-4": {"lr": 5e-4, "loss_params": IN},
    "lr2e-3": {"lr": 2e-3, "loss_params": IN},
    "bs64": {"batch_size": 64, "loss_params": IN},
    "bs128": {"batch_size": 128, "loss_params": IN},
}


def _params(ov: dict) -> dict:
    lp = dict(ov.get("loss_params", {}))
    lp.pop("name", None)
    return {**{k: v for k, v in ov.items() if k != "loss_params"}, **({"loss_params": lp} if lp else {})}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "atae-evidence")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "evidence_infonce_sweep.json")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--reuse-runs", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    shared = ev.shared_root()
    if shared is None:
        print("skipped: ../shared (or $ATAE_SHARED) is absent", file=sys.stderr)
        return 0
    ctx = ev.Ctx(shared, args.cache, args)
    train_ds, val_ds = ctx.esc((1, 2)), ctx.esc((3,))
    atab, ttab = ctx.tables("efficientat-mn04", train_ds, val_ds)
    val = ev.EscFold(ctx, val_ds, atab, ttab, with_bridge=False)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = doc.setdefault("variants", {})
    for name in args.variants.split(","):
        ov = VARIANTS[name]
        seeds, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            model, info = ev.train(ctx, f"sweep-infonce-{name}", "atae-infonce", _params(ov), seed,
                                   train_ds, val_ds, None, atab, ttab)
            cls, _ = val.adapter_scores(model)
            pq = val.per_query(cls, np.zeros((len(val.cap_rel), len(val.keys))))["class"]
            stage = (info or {}).get("stages", [{}])[0]
            seeds.append({"seed": seed, **{m: float(np.mean(pq[m])) for m in ev.CLASS_COLS},
                          "best_epoch": stage.get("best_epoch"),
                          "caption_val_mAP@10": stage.get("best_val_mAP@10"),
                          "temperature": model.train_summary["loss"].get("temperature")
                          if getattr(model, "train_summary", None) else None})
        row = {"overrides": ov, "seeds": seeds, "seconds": time.perf_counter() - t0,
               **{f"fold3 class {m}": float(np.mean([s[m] for s in seeds])) for m in ev.CLASS_COLS},
               "fold3 class mAP@10 sd": float(np.std([s["mAP@10"] for s in seeds], ddof=1))}
        results[name] = row
        print(f"{name:16s} fold-3 class mAP@10 {row['fold3 class mAP@10']:.4f} ± "
              f"{row['fold3 class mAP@10 sd']:.4f}  R@1 {row['fold3 class R@1']:.3f}  "
              f"epochs {[s['best_epoch'] for s in seeds]}  T {[s['temperature'] for s in seeds]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        best_first = sorted(results, key=lambda k: -results[k]["fold3 class mAP@10"])
        doc["variants"] = {k: results[k] for k in best_first}
        tmp.write_text(json.dumps(doc, indent=1, default=float))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
