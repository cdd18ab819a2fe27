"""Quality harness: the product's three scorers (adapter, bridge, hybrid) on real data, every row DEV or TEST.

Everything is scored through ``atae.evaluate.scores_for`` (the matrices the product ranks with), trained
with ``atae.train.run_recipe`` (which stores the caption reference and, with a tagging audio tower, tunes
the hybrid weight and novelty gate on the validation set: ``atae.tuning.tune_after_training``), and
measured with ``atae.metrics`` (jackknife 95% CIs). Towers: EfficientAT mn04 + MiniLM and the offline
default aiSFX + MiniLM (no AudioSet head: its bridge and hybrid cells say so). Recipes: ``atae`` (seed
loss, the main rows) and ``atae-infonce``.

Protocols (ESC-50: one query per class, its name with "_" as space, the fold's clips of the class relevant,
DCASE 2025 AP@10, each fold ranked over its own 400 clips. AudioCaps: the 43 captioned clips, every caption
a query with its own clip relevant, DCASE 2022 metrics; halves by sorted file name, A = even positions,
B = odd, as bench/fusion_study.py):

(a) ESC-50 in domain. Bridge: zero-shot on folds 1-4 and their mean. Adapter / hybrid: train folds 1-2,
    early stopping on fold 3 and the hybrid tuned on fold 3's class-name queries (the product's tuning
    functions, as `atae tune` on queries like the user's); refit on folds 1-3 for the chosen epoch count
    (no validation) with that weight, the gate set again in the refit's own space on the same queries;
    fold 4 scored once.
(b) AudioCaps, 5-fold over the clips (bench/evidence.py's seeded folds): train 3 folds, validate on the
    next (early stopping + tuning), test on the held-out fold over its own clips; per-query values pooled.
    Bridge: all 43 clips, and the same 5 test pools for comparison.
(c) Cross-domain: train ESC-50 folds 1-3, validate (early stopping, and the hybrid tuned on its class
    names) on fold 4; query all 43 AudioCaps clips, and half B.
(d) Reverse: train AudioCaps half A, validate on half B; query ESC-50 folds 1-4 (mean), and fold 4.

Labels: TEST = nothing (bridge rule, fusion method, epochs, weights) was chosen on the set scored; DEV =
something was (the bridge on ESC-50 folds 1-3 + AudioCaps half A, bench/bridge_study.py; the fusion method
on ESC-50 folds 1-3 + AudioCaps half A, bench/fusion_study.py's DEV protocols).

    python bench/quality.py [--seeds 3] [--cache /tmp/atae-quality/cache] [--out bench/results/quality.json]

Features and trained runs are cached under --cache (never in the repo); a second run only scores (after
re-tuning cached runs whose tuning / scoring code changed; runs trained by other training code are listed,
--retrain refreshes them). Each run's marker records the hashes of the src/atae code it was made with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evidence as ev  # noqa: E402  (towers, ESC-50 / AudioCaps datasets, feature tables, aggregation)
from atae.errors import AtaeError  # noqa: E402
from atae.metrics import (  # noqa: E402
    jackknife,
    jsonable,
    per_query_dcase2022,
    per_query_multi,
    ranks_single,
)

TOWERS = {"mn04": "efficientat-mn04", "aisfx": "aisfx"}
TOWER_LABEL = {"mn04": "mn04 + MiniLM", "aisfx": "aiSFX + MiniLM"}
RECIPES = ("atae", "atae-infonce")
SCORERS = ("adapter", "bridge", "hybrid")
METRICS = ("mAP@10", "R@1", "R@10")
AC_FOLDS = 5
TUNED_EXTRAS = ("bridge_temperature", "hybrid_weight", "hybrid_gate", "tuned_on")  # atae.tuning's keys


def code_hash(*parts: str) -> str:
    """Short hash of atae's source files under ``parts`` (files or folders of src/atae)."""
    import atae

    root, h = Path(atae.__file__).parent, hashlib.sha1()
    for part in parts:
        files = sorted(p for p in (root / part).rglob("*") if p.is_file() and p.suffix in (".py", ".toml")) \
            if (root / part).is_dir() else [root / part]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


CODE = {"training": code_hash("train", "losses", "model.py", "recipes"),
        "tuning": code_hash("tuning.py", "scoring.py", "bridge.py")}
PRODUCT: dict = {}  # filled by product_version() when main starts
SECTIONS = {
    "a": "(a) ESC-50 class queries, in domain (adapters: train 1-2, stop + tune on 3, refit 1-3)",
    "b": "(b) AudioCaps 43 clips (adapters: 5-fold CV, each test fold over its own clips)",
    "c": "(c) Cross-domain: adapters trained on ESC-50 folds 1-3 (stop + tune on fold 4), AudioCaps queries",
    "d": "(d) Reverse: adapters trained on AudioCaps half A (stop + tune on half B), ESC-50 class queries",
}
# (section, set) -> (split of the bridge, adapter and hybrid rows; why the DEV ones are DEV)
DEV_BRIDGE = "bridge chosen on folds 1-3"
SPLITS = {
    ("a", "fold 1"): ({"bridge": "DEV"}, DEV_BRIDGE),
    ("a", "fold 2"): ({"bridge": "DEV"}, DEV_BRIDGE),
    ("a", "fold 3"): ({"bridge": "DEV"}, DEV_BRIDGE),
    ("a", "fold 4"): ({"bridge": "TEST", "adapter": "TEST", "hybrid": "TEST"}, ""),
    ("a", "folds 1-4 mean"): ({"bridge": "DEV"}, DEV_BRIDGE),
    ("b", "all 43 clips"): ({"bridge": "DEV"}, "bridge chosen on half A"),
    ("b", "5-fold test pools"): ({"bridge": "DEV", "adapter": "TEST", "hybrid": "DEV"},
                                 "bridge and fusion chosen on half A"),
    ("c", "all 43 clips"): ({"bridge": "DEV", "adapter": "TEST", "hybrid": "DEV"},
                            "bridge and fusion chosen on half A"),
    ("c", "half B"): ({"bridge": "TEST", "adapter": "TEST", "hybrid": "TEST"}, ""),
    ("d", "folds 1-4 mean"): ({"bridge": "DEV", "adapter": "DEV", "hybrid": "DEV"},
                              "bridge, fusion and InfoNCE defaults chosen on folds 1-3"),
    ("d", "fold 4"): ({"bridge": "TEST", "adapter": "TEST", "hybrid": "TEST"}, ""),
}


@dataclass
class Problem:
    """Queries over candidate clips: what each scorer ranks."""
    keys: list[str]  # candidate clip keys
    texts: list[str]
    seqs: list  # the queries' MiniLM token sequences (the adapters' input)
    rel: list  # per query: a list of relevant columns (multi) or one column (single)
    multi: bool

    def per_query(self, scores: np.ndarray) -> dict[str, np.ndarray]:
        if self.multi:
            pq = per_query_multi(scores, self.rel, k=10)
        else:
            pq = per_query_dcase2022(ranks_single(scores, np.asarray(self.rel)))
        return {m: pq[m] for m in METRICS}


def pooled(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}


# ------------------------------------------------------------------------------------------ inputs
class Quality:
    """Datasets, feature tables, problems, cached training runs and the product's scorers."""

    def __init__(self, shared: Path, cache: Path, args):
        from atae.bridge import require_tag_head
        from atae.data.esc50 import humanise

        self.args, self.runs_dir = args, cache / "runs"
        self.ctx = ctx = ev.Ctx(shared, cache, args)
        self.folds = {f: ctx.esc((f,)) for f in (1, 2, 3, 4)}
        self.ac = ctx.audiocaps()
        self.tables = {t: ctx.tables(TOWERS[t], *self.folds.values(), self.ac) for t in args.towers}
        self.no_head: dict[str, str] = {}  # tower -> the product's refusal of the bridge / hybrid
        for t in args.towers:
            try:
                require_tag_head(ctx.audio_tower(TOWERS[t]))
            except AtaeError as e:
                self.no_head[t] = str(e).split(" (fix:")[0]
        self.ttab = next(iter(self.tables.values()))[1]  # one text table (MiniLM) for every audio tower
        self.sets = {"f12": ctx.esc((1, 2)), "f123": ctx.esc((1, 2, 3)), "f3": self.folds[3],
                     "f4": self.folds[4]}
        # ESC-50: one query per class over each fold's own clips
        cat = {c.key: ctx.category[Path(c.key).stem] for ds in self.folds.values() for c in ds.clips}
        classes = sorted(set(cat.values()))
        texts = [humanise(c) for c in classes]
        seqs = ctx.query_seqs(texts)
        self.esc = {f: Problem(ds.keys(), texts, seqs,
                               [[j for j, k in enumerate(ds.keys()) if cat[k] == c] for c in classes], True)
                    for f, ds in self.folds.items()}
        # AudioCaps: halves by sorted file name, 5 seeded folds over the clips (as bench/evidence.py)
        n = len(self.ac.clips)
        order = sorted(range(n), key=lambda i: Path(self.ac.clips[i].path).name)
        self.halves = {"A": sorted(order[0::2]), "B": sorted(order[1::2])}
        self.ac_folds = [sorted(f.tolist()) for f in
                         np.array_split(np.random.default_rng(0).permutation(n), AC_FOLDS)]
        self.sets["acA"], self.sets["acB"] = (self.ac_subset(self.halves[h], f"audiocaps-half{h}")
                                              for h in "AB")
        self.train_seconds = 0.0
        self.run_info: dict[str, dict] = {}

    def ac_subset(self, clip_idx, name: str):
        from atae.data import CaptionDataset

        return CaptionDataset(name=name, clips=[self.ac.clips[i] for i in sorted(clip_idx)])

    def ac_problem(self, clip_idx) -> Problem:
        """Every caption of the given clips queries those clips (their own clip relevant)."""
        clips = [self.ac.clips[i] for i in sorted(clip_idx)]
        pairs = [(j, f"{c.key}#{i}", t) for j, c in enumerate(clips) for i, t in enumerate(c.captions)]
        return Problem([c.key for c in clips], [t for _, _, t in pairs],
                       [self.ttab.get(k) for _, k, _ in pairs], [j for j, _, _ in pairs], False)

    # ------------------------------------------------------------------------------------- training
    def train(self, tower: str, recipe: str, name: str, seed: int, train_ds, val_ds=None, *,
              epochs: list[int] | None = None, extras_from=None):
        """A trained model (cached under --cache/runs) and its info.

        With ``val_ds``: early stopping on it, then run_recipe's own tuning (hybrid weight + gate) on it.
        Without (a refit): exactly ``epochs`` epochs per stage; the extras tuned by ``extras_from`` are
        copied in, since run_recipe without validation stores none; the caption reference is the refit's.
        A cached run is re-tuned (the product's ``tune_after_training``) when atae's tuning / scoring code
        changed since it was tuned; one trained by other training code is reused but listed as such
        (``--retrain`` refreshes every run: about 25 minutes)."""
        from atae.model import AlignedModel
        from atae.train import run_recipe
        from atae.tuning import tune_after_training

        a = self.args
        how = f"refit-e{'-'.join(map(str, epochs))}" if epochs else f"p{a.patience}-e{a.max_epochs}"
        tag = f"{tower}-{recipe}-{name}-{how}-s{seed}"
        out = self.runs_dir / tag
        marker = out / "quality-run.json"
        atab, ttab = self.tables[tower]
        info = json.loads(marker.read_text()) if marker.exists() and not a.retrain else {}
        if info:
            model = AlignedModel.load(out)
            if val_ds is not None and info.get("tuning_code") != CODE["tuning"]:
                info["tuning"] = tune_after_training(model, (val_ds, atab, ttab), out,
                                                     text_tower=self.ctx.text_tower)
                print(f"  re-tuned {tag}: {info['tuning']}", flush=True)
        else:
            marker.unlink(missing_ok=True)
            kw = {"stage_epochs": epochs} if epochs else {"patience": a.patience, "max_epochs": a.max_epochs}
            t0 = time.perf_counter()
            res = run_recipe(recipe, train_ds, val_ds, None, atab, ttab, out, restart=True, progress=False,
                             seed=seed, text_tower=self.ctx.text_tower, **kw)
            model, dt = res.model, time.perf_counter() - t0
            self.train_seconds += dt
            info = {"train": train_ds.name, "val": getattr(val_ds, "name", None), "seed": seed,
                    "seconds": round(dt, 1), "refit_epochs": epochs, "trained_at": PRODUCT["git_head"],
                    "training_code": CODE["training"],
                    "stages": [{"best_epoch": r.best_epoch, "epochs_run": r.epochs_run,
                                "best_val_mAP@10": r.best_score} for r in res.stages],
                    "tuning": res.summary.get("tuning"),
                    "caption_reference": len(ref) if (ref := model.caption_reference) is not None else 0}
            print(f"  trained {tag} in {dt:.0f} s: epochs " + ", ".join(
                f"{r.best_epoch}/{r.epochs_run}" for r in res.stages), flush=True)
        if extras_from is not None:
            model.extras.update({k: v for k, v in extras_from.extras.items() if k in TUNED_EXTRAS})
            model.save(out)
        info["tuning_code"] = CODE["tuning"]
        info["extras"] = {k: model.extras[k] for k in TUNED_EXTRAS if k in model.extras}
        marker.write_text(json.dumps(info, indent=1, default=float))
        self.run_info[tag] = info
        return model, info

    # -------------------------------------------------------------------------------------- scoring
    def scores(self, scorer: str, tower: str, problem: Problem, model=None) -> np.ndarray:
        from atae.evaluate import scores_for

        return scores_for(scorer, candidates=problem.keys, texts=problem.texts,
                          audio_table=self.tables[tower][0], model=model, text_seqs=problem.seqs,
                          text_tower=self.ctx.text_tower,
                          audio_tower=self.ctx.audio_tower(TOWERS[tower]))

    def tune_on(self, tower: str, model, problem: Problem, weight: float | None = None) -> None:
        """The product's tuning (``atae.tuning``) run on a protocol's own validation queries, as a user tunes
        on queries like theirs (``atae tune``): for ESC-50 the class names, not the template captions
        run_recipe tuned on. The hybrid weight on their AP@10 (unless given) and the novelty gate."""
        from atae import scoring, tuning

        if tower in self.no_head:
            return
        if weight is None:
            weight = tuning.tune_hybrid_weight(self.scores("adapter", tower, problem, model),
                                               self.scores("bridge", tower, problem, model), problem.rel)
        model.extras[scoring.EXTRA_HYBRID_WEIGHT] = float(weight)
        gate = tuning.gate_threshold(model, model.encode_text(problem.seqs))
        if gate is not None:
            model.extras[scoring.EXTRA_HYBRID_GATE] = gate

    def bridge_only_share(self, model, problem: Problem) -> float:
        """Share of the queries the hybrid's novelty gate sends to the bridge alone (weight 0)."""
        from atae.scoring import Fusion

        fusion = Fusion.of(model)
        if fusion.weight == 0.0:
            return 1.0
        return float(np.mean(fusion.weights(model.encode_text(problem.seqs)) == 0.0))


# ------------------------------------------------------------------------------------------ protocols
class Cells:
    """Per-query values of every (section, set, tower, scorer, recipe): one dict per seed."""

    def __init__(self):
        self.values: dict[tuple, list[dict]] = {}
        self.extra: dict[tuple, dict] = {}  # hybrid rows: tuned weights and bridge-only shares per seed

    def add(self, key: tuple, per_query: dict, **extra):
        self.values.setdefault(key, []).append(per_query)
        for k, v in extra.items():
            self.extra.setdefault(key, {}).setdefault(k, []).append(v)

    def seed_mean(self, key: tuple, metric: str = "mAP@10") -> np.ndarray:
        return np.mean([p[metric] for p in self.values[key]], axis=0)


def trained_rows(q: Quality, cells: Cells, section: str, tower: str, recipe: str,
                 model, problems: dict[str, list[Problem]]):
    """Adapter (and, with tags, hybrid) per-query values of one model on each named set (folds pooled)."""
    for set_name, probs in problems.items():
        cells.add((section, set_name, tower, "adapter", recipe),
                  pooled([p.per_query(q.scores("adapter", tower, p, model)) for p in probs]))
        if tower not in q.no_head:
            cells.add((section, set_name, tower, "hybrid", recipe),
                      pooled([p.per_query(q.scores("hybrid", tower, p, model)) for p in probs]),
                      w=model.extras.get("hybrid_weight"),
                      bridge_only=float(np.mean([q.bridge_only_share(model, p) for p in probs])))


def run_protocols(q: Quality, seeds: list[int]) -> Cells:
    cells = Cells()
    esc_all = {"folds 1-4 mean": [q.esc[f] for f in (1, 2, 3, 4)], "fold 4": [q.esc[4]]}
    ac_all, ac_b = q.ac_problem(range(len(q.ac.clips))), q.ac_problem(q.halves["B"])
    ac_pools = [q.ac_problem(f) for f in q.ac_folds]
    for tower in q.args.towers:
        if tower not in q.no_head:  # zero-shot bridge: no training, one "seed"
            def bridge(section, set_name, probs, tower=tower):
                cells.add((section, set_name, tower, "bridge", None),
                          pooled([p.per_query(q.scores("bridge", tower, p)) for p in probs]))
            for f in (1, 2, 3, 4):
                bridge("a", f"fold {f}", [q.esc[f]])
            bridge("a", "folds 1-4 mean", esc_all["folds 1-4 mean"])
            bridge("b", "all 43 clips", [ac_all])
            bridge("b", "5-fold test pools", ac_pools)
            bridge("c", "all 43 clips", [ac_all])
            bridge("c", "half B", [ac_b])
            for set_name, probs in esc_all.items():
                bridge("d", set_name, probs)
        for recipe in q.args.recipes:
            for seed in seeds:
                print(f"{tower} {recipe} seed {seed}", flush=True)
                # (a) stop + tune on fold 3, refit on folds 1-3 for the chosen epochs, score fold 4 once
                sel, info = q.train(tower, recipe, "esc-f12-v3", seed, q.sets["f12"], q.sets["f3"])
                q.tune_on(tower, sel, q.esc[3])
                refit, _ = q.train(tower, recipe, "esc-f123", seed, q.sets["f123"],
                                   epochs=[st["best_epoch"] for st in info["stages"]], extras_from=sel)
                # the weight stays the one chosen on fold 3; the gate is set in the refit's own space
                q.tune_on(tower, refit, q.esc[3], weight=sel.extras.get("hybrid_weight"))
                trained_rows(q, cells, "a", tower, recipe, refit, {"fold 4": [q.esc[4]]})
                # (b) 5-fold over the AudioCaps clips
                models = []
                for k in range(AC_FOLDS):
                    val = (k + 1) % AC_FOLDS
                    train = [i for j, f in enumerate(q.ac_folds) if j not in (k, val) for i in f]
                    models.append(q.train(tower, recipe, f"ac5-k{k}", seed,
                                          q.ac_subset(train, f"ac5-train{k}"),
                                          q.ac_subset(q.ac_folds[val], f"ac5-val{val}"))[0])
                part = Cells()
                for k, model in enumerate(models):
                    trained_rows(q, part, "b", tower, recipe, model, {"5-fold test pools": [ac_pools[k]]})
                for key, vals in part.values.items():
                    cells.add(key, pooled(vals), **{k: float(np.mean(v)) for k, v in
                                                    part.extra.get(key, {}).items() if None not in v})
                # (c) ESC-50 folds 1-3 (stop + tune on fold 4) -> AudioCaps
                model, _ = q.train(tower, recipe, "esc-f123-v4", seed, q.sets["f123"], q.sets["f4"])
                q.tune_on(tower, model, q.esc[4])
                trained_rows(q, cells, "c", tower, recipe, model,
                             {"all 43 clips": [ac_all], "half B": [ac_b]})
                # (d) AudioCaps half A (stop + tune on half B) -> ESC-50
                model, _ = q.train(tower, recipe, "acA-vB", seed, q.sets["acA"], q.sets["acB"])
                trained_rows(q, cells, "d", tower, recipe, model, esc_all)
    return cells


# ------------------------------------------------------------------------------------------ results
def row_split(section: str, set_name: str, scorer: str) -> tuple[str, str]:
    splits, why = SPLITS[(section, set_name)]
    return splits[scorer], (why if splits[scorer] == "DEV" else "")


def table_rows(q: Quality, cells: Cells) -> list[dict]:
    rows = []
    for (section, set_name, tower, scorer, recipe), per_seed in cells.values.items():
        split, why = row_split(section, set_name, scorer)
        row = {"section": section, "set": set_name, "tower": tower, "scorer": scorer, "recipe": recipe,
               "split": split, "dev_because": why, "n_queries": len(per_seed[0]["mAP@10"]),
               "metrics": {m: v for m, v in ev.aggregate(per_seed).items() if m in METRICS}}
        extra = cells.extra.get((section, set_name, tower, scorer, recipe))
        if extra:
            row.update({k: v for k, v in extra.items()})
        rows.append(row)
    order = {(s, n): i for i, (s, n) in enumerate(SPLITS)}
    rows.sort(key=lambda r: (r["section"], q.args.towers.index(r["tower"]), order[(r["section"], r["set"])],
                             SCORERS.index(r["scorer"]), RECIPES.index(r["recipe"]) if r["recipe"] else -1))
    return rows


def paired(cells: Cells, a: tuple, b: tuple) -> dict:
    """Paired jackknife of the seed-averaged per-query mAP@10 difference a - b."""
    j = jackknife(cells.seed_mean(a) - cells.seed_mean(b))
    return {"diff": j.mean, "ci_low": j.ci_low, "ci_high": j.ci_high}


PAIRED = "paired jackknife 95% CI"


def checks(cells: Cells, recipes) -> list[dict]:
    out = []
    mean = lambda key: float(cells.seed_mean(key).mean())  # noqa: E731
    for recipe in recipes:
        for set_name, must in (("all 43 clips", True), ("half B", False)):
            hyb, ad, brg = (("c", set_name, "mn04", s, r) for s, r in
                            (("hybrid", recipe), ("adapter", recipe), ("bridge", None)))
            best = max((ad, brg), key=mean)
            d = paired(cells, hyb, best)
            out.append({"check": f"1{'' if must else ' (extra, half B)'}", "recipe": recipe,
                        "pass": d["diff"] >= -0.01, "must": must, "ci": PAIRED,
                        "text": f"hybrid (c) {set_name} {mean(hyb):.3f} >= max(bridge {mean(brg):.3f}, "
                                f"adapter {mean(ad):.3f}) - 0.01", **d, "vs": best[3]})
        hyb, ad = ("a", "fold 4", "mn04", "hybrid", recipe), ("a", "fold 4", "mn04", "adapter", recipe)
        d = paired(cells, hyb, ad)
        out.append({"check": "2", "recipe": recipe, "pass": d["diff"] >= -0.01, "must": True, "ci": PAIRED,
                    "text": f"hybrid (a) fold 4 {mean(hyb):.3f} >= adapter {mean(ad):.3f} - 0.01", **d,
                    "vs": "adapter"})
    for name, key, bar in (("bridge AudioCaps-43", ("b", "all 43 clips"), 0.65),
                           ("bridge ESC-50 folds 1-4", ("a", "folds 1-4 mean"), 0.74)):
        key = (*key, "mn04", "bridge", None)
        j = jackknife(cells.seed_mean(key))
        out.append({"check": name, "recipe": None, "pass": j.mean >= bar, "must": True,
                    "ci": "jackknife 95% CI",
                    "text": f"{name} mAP@10 {j.mean:.3f} >= {bar}", "diff": j.mean - bar,
                    "ci_low": j.ci_low - bar, "ci_high": j.ci_high - bar, "vs": f"bar {bar}"})
    return out


def check_line(c: dict) -> str:
    who = f" [{c['recipe']}]" if c["recipe"] else ""
    return (f"{'PASS' if c['pass'] else 'FAIL'}  check {c['check']}{who}: {c['text']}; difference "
            f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] ({c['ci']})")


def fmt(m: dict) -> str:
    sd = f" ± {m['sd']:.3f}" if len(m.get("seeds", [])) > 1 else ""
    ci = f" [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" if m.get("ci_low") is not None else ""
    return f"{m['value']:.3f}{sd}{ci}"


def markdown(res: dict) -> str:
    s, pv, sec_ = res["settings"], res["product"], res["seconds"]
    stale = pv["runs_by_other_training_code"]
    head = [
        f"Created {res['created']}; seeds {s['seeds']}; patience {s['patience']}, at most {s['max_epochs']} "
        "epochs (the recipes say 10 / 200; reduced as bench/evidence.py and bench/fusion_study.py do).",
        f"This invocation: {sec_['total']:.0f} s on {res['cpu_count']} shared CPU cores (training "
        f"{sec_['training']:.0f} s; the cached runs took {sec_['runs_trained']:.0f} s to train).",
        f"atae at {pv['git_head']}" + (f" + uncommitted {pv['uncommitted_src']}" if pv["uncommitted_src"]
                                       else "") + f" (code hashes {pv['code']}).",
        f"{len(stale)} of the {len(res['runs'])} cached runs were trained when atae's training code "
        "hashed otherwise (each run's hash is in the JSON; --retrain refreshes them)." if stale else "",
        "Cells: mean ± sd over seeds [95% jackknife CI of the seed-averaged per-query values]; zero-shot "
        "rows have no sd. w: the hybrid weight run_recipe tuned on validation (per seed); to bridge: share "
        "of queries the novelty gate sends to the bridge alone.",
    ]
    L = ["# Quality: adapter, bridge and hybrid scorers (bench/quality.py)", "", " ".join(filter(None, head))]
    L.append("")
    for sec, title in SECTIONS.items():
        rows = [r for r in res["rows"] if r["section"] == sec]
        if not rows:
            continue
        L += [f"## {title}", "",
              "| towers | set | split | scorer | recipe | mAP@10 | R@1 | R@10 | w | to bridge |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            w = "/".join(f"{x:g}" for x in r["w"]) if r.get("w") else ""
            share = f"{np.mean(r['bridge_only']):.0%}" if "bridge_only" in r else ""
            L.append(f"| {TOWER_LABEL[r['tower']]} | {r['set']} | {r['split']} | {r['scorer']} | "
                     f"{r['recipe'] or 'zero-shot'} | " + " | ".join(fmt(r["metrics"][m]) for m in METRICS)
                     + f" | {w} | {share} |")
        for t, why in res["no_head"].items():
            L.append(f"| {TOWER_LABEL[t]} | all | | bridge, hybrid | | n/a: {why} | | | | |")
        L.append("")
    L += ["## Checks", "", *(f"- {check_line(c)}" for c in res["checks"]), "",
          "## What was chosen where (DEV) and what is clean (TEST)", "",
          *(f"- {n}" for n in res["chosen"]), "",
          "## Notes", "", *(f"- {n}" for n in res["notes"])]
    return "\n".join(L) + "\n"


CHOSEN = [
    "Bridge rule (p . sqrt(t)), temperature 0.07 and prompt 'the sound of {label}': ESC-50 folds 1-3 + "
    "AudioCaps half A (bench/bridge_study.py). So every bridge-using row on folds 1-3, on their mean with "
    "fold 4, or on all 43 AudioCaps clips (half A included) is DEV; fold 4 and half B are clean.",
    "Fusion method (z-score mix with a tuned weight + novelty gate in the text-adapter space): the fusion "
    "study's DEV protocols (ESC-50 folds 1-3 and AudioCaps half A; bench/fusion_study.py). Hybrid rows on "
    "those sets are DEV.",
    "InfoNCE recipe defaults: ESC-50 fold-3 validation (bench/evidence_infonce_sweep.py), so (d)'s mean over "
    "folds 1-4 is DEV for the adapters too.",
    "Per run (this script): epochs by early stopping and the hybrid weight + gate by run_recipe's tuning, on "
    "the protocol's validation set only (fold 3 for (a), the next fold for (b), fold 4 for (c), half B for "
    "(d)); never on the set a TEST row scores. Patience / max epochs: fixed for runtime, not tuned.",
]


def notes(q: Quality) -> list[str]:
    return [
        "(a) refit: run_recipe without validation (stage_epochs = the early-stopped run's best epochs) "
        "stores no tuned extras; the refit keeps the hybrid weight chosen on fold 3 with the folds 1-2 "
        "model, and its gate is set again on fold 3's class names against its own caption reference "
        "(folds 1-3 captions in the refit's text-adapter space): a gate threshold belongs to the space it "
        "was measured in.",
        "(a), (c): after training, the hybrid is tuned on the validation fold's class-name queries with "
        "atae.tuning's functions (weight: tune_hybrid_weight on their AP@10; gate: gate_threshold), as a "
        "user runs `atae tune` on queries like theirs. run_recipe's own tuning used the validation "
        "captions, which for ESC-50 are atae.data.esc50's template sentences, a form these queries do not "
        "take (the gate then sends some class names to the bridge: see the fusion study). (b), (d) keep "
        "run_recipe's tuning: their validation captions are the form of their queries.",
        "(b) each test fold has 8-9 clips, so R@10 is 1 by construction and mAP@10 is high for every scorer; "
        "compare rows of the same set only (the bridge's 5-fold row uses the same pools).",
        "ESC-50 'folds 1-4 mean': the 4 x 50 per-query values pooled (equal sizes, so the mean of the fold "
        "means); the jackknife treats the 200 queries as independent though each class name recurs.",
        f"AudioCaps halves: {len(q.halves['A'])} clips in A, {len(q.halves['B'])} in B (sorted file names, "
        "even / odd positions, as bench/fusion_study.py).",
        "Checks use mean mAP@10 (seed-averaged); check 2 is one-sided (hybrid not worse than the adapter by "
        "more than 0.01). Check 1 compares with whichever of bridge / adapter has the higher mean.",
    ]


# ------------------------------------------------------------------------------------------ main
def product_version() -> dict:
    """The atae source this run measured: git HEAD, uncommitted changes under src/, code hashes."""
    import subprocess

    def git(*cmd):
        r = subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    PRODUCT.update(git_head=git("rev-parse", "--short", "HEAD"), code=CODE,
                   uncommitted_src=(git("status", "--porcelain", "src") or "").splitlines())
    return PRODUCT


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/atae-quality/cache"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--towers", default="mn04,aisfx", help=f"comma list of {list(TOWERS)}")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {list(RECIPES)}")
    ap.add_argument("--retrain", action="store_true", help="retrain every run (default: reuse the cache)")
    args = ap.parse_args(argv)
    args.towers = [t for t in args.towers.split(",") if t]
    args.recipes = [r for r in args.recipes.split(",") if r]
    import torch

    torch.set_num_threads(1)
    shared = ev.shared_root()
    if shared is None:
        print("skipped: ../shared (or $ATAE_SHARED) is absent")
        return 0
    t0 = time.perf_counter()
    product_version()
    args.cache.mkdir(parents=True, exist_ok=True)
    q = Quality(shared, args.cache, args)
    t_inputs = time.perf_counter() - t0
    print(f"inputs ready in {t_inputs:.0f} s", flush=True)
    seeds = list(range(args.seeds))
    cells = run_protocols(q, seeds)
    rows = table_rows(q, cells)
    res = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "settings": {"seeds": seeds, "patience": args.patience, "max_epochs": args.max_epochs,
                        "towers": {t: TOWER_LABEL[t] for t in args.towers}, "recipes": args.recipes,
                        "bridge": "p . sqrt(t), T = 0.07, 'the sound of {label}' (atae.bridge defaults)"},
           "product": {**PRODUCT, "runs_by_other_training_code": sorted(
               t for t, r in q.run_info.items() if r.get("training_code") != CODE["training"])},
           "no_head": q.no_head, "rows": rows,
           "checks": checks(cells, args.recipes) if "mn04" in args.towers else [],
           "chosen": CHOSEN, "notes": notes(q),
           "halves": {h: [q.ac.clips[i].key for i in c] for h, c in q.halves.items()},
           "audiocaps_folds": [[q.ac.clips[i].key for i in f] for f in q.ac_folds], "runs": q.run_info}
    res["seconds"] = {"inputs (features)": round(t_inputs, 1), "training": round(q.train_seconds, 1),
                      "runs_trained": round(sum(r.get("seconds", 0) for r in q.run_info.values()), 1),
                      "total": round(time.perf_counter() - t0, 1)}
    res = jsonable(res)
    md = markdown(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out, json.dumps(res, indent=1)), (args.out.with_suffix(".md"), md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md)
    print("\n".join(check_line(c) for c in res["checks"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({res['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
