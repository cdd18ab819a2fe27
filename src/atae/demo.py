"""`atae demo`: the whole seed pipeline on a corpus atae synthesises itself (no download, no ../shared).

Steps: synthesise the corpus -> extract frozen-tower features once -> train the ATAE recipe ->
evaluate on the test split (DCASE 2022 metrics with jackknife CIs) -> answer example queries.
Deterministic for a given seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atae.data.synthetic import EXAMPLE_QUERIES  # paraphrases, not the caption templates


@dataclass
class DemoResult:
    out_dir: Path
    metrics: dict
    queries: dict  # query -> list of (clip key, score)
    towers: tuple[str, str]
    seconds: float


def layout(out_dir: str | Path) -> dict[str, Path]:
    """Where the demo writes: the corpus (its audio), the features, the trained run and the library."""
    out = Path(out_dir)
    return {"corpus": out / "corpus", "audio": out / "corpus" / "audio", "features": out / "features",
            "run": out / "run", "library": out / "library"}


def run_demo(out_dir: str | Path, *, seed: int = 0, audio_encoder: str = "aisfx",
             text_encoder: str = "minilm", max_epochs: int = 100, clips_per_concept: int = 12,
             progress: bool = True, log=print) -> DemoResult:
    from atae.data import read_caption_csv
    from atae.data.synthetic import concept_of, make_demo_corpus
    from atae.evaluate import evaluate_dataset, score_matrix
    from atae.features import ensure_dataset_features
    from atae.towers.registry import get_audio_tower, get_text_tower
    from atae.train import load_recipe, run_recipe
    from atae.train.runner import tower_weights_files

    t0 = time.perf_counter()
    out, where = Path(out_dir), layout(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed)

    log(f"[1/5] synthesising the demo corpus (seed {seed}) in {where['corpus']}")
    corpus = make_demo_corpus(where["corpus"], seed=seed, clips_per_concept=clips_per_concept)
    splits = {name: read_caption_csv(corpus[name], corpus["audio_dir"]) for name in ("train", "val", "test")}
    for name, ds in splits.items():
        log(f"      {name}: {len(ds.clips)} clips, {sum(len(c.captions) for c in ds.clips)} captions")

    log(f"[2/5] towers: audio={audio_encoder} text={text_encoder} (frozen); extracting features once")
    audio_tower = get_audio_tower(audio_encoder)
    text_tower = get_text_tower(text_encoder)
    feats = where["features"]
    # one store for all splits: the tables returned last hold every split's keys
    for name, ds in splits.items():
        audio_table, text_table, report = ensure_dataset_features(
            ds, audio_tower, text_tower, feats, progress=progress)
        if report.failed:
            log(f"      {name}: {len(report.failed)} unreadable files skipped")

    log("[3/5] training the ATAE recipe (seed loss, Adam 1e-3, batch 32, early stopping on val mAP@10)")
    recipe = load_recipe("atae")
    run_dir = where["run"]
    run = run_recipe(
        recipe,
        clean_train=splits["train"],
        clean_val=splits["val"],
        noisy=None,
        audio_table=audio_table,
        text_table=text_table,
        out_dir=run_dir,
        seed=seed,
        max_epochs=max_epochs,
        progress=progress,
        weights_files=tower_weights_files(audio_tower, text_tower),
    )
    model = run.model
    best = run.summary["stages"][-1]
    log(f"      best val mAP@10 {best['best_val_mAP@10']:.3f} at epoch {best['best_epoch']}"
        f" ({best['epochs_run']} epochs run)")

    log("[4/5] evaluating on the test split (every caption is a query)")
    result = evaluate_dataset(model, splits["test"], audio_table, text_table)
    metrics = result.metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    n_clips = len(splits["test"].clips)
    per_concept = n_clips // max(1, len({concept_of(c.key) for c in splits["test"].clips}))
    log(f"      chance level: R@1 {1 / n_clips:.3f}, R@10 {min(1.0, 10 / n_clips):.3f}; each concept has"
        f" {per_concept} test clips with look-alike captions, so R@1 tops out near {1 / per_concept:.2f}")
    for name in ("R@1", "R@5", "R@10", "mAP@10"):
        m = metrics[name]
        log(f"      {name:7s} {m['value']:.3f}  (95% CI {m['ci_low']:.3f} - {m['ci_high']:.3f})")

    log("[5/5] example queries (top 5 test clips)")
    keys = [c.key for c in splits["test"].clips]
    seqs = text_tower.encode(list(EXAMPLE_QUERIES))
    scores = score_matrix(model, audio_table, keys, seqs)
    answers = {}
    for qi, q in enumerate(EXAMPLE_QUERIES):
        order = np.argsort(-scores[qi], kind="stable")[:5]
        answers[q] = [(keys[j], float(scores[qi, j])) for j in order]
        log(f'      "{q}"')
        for rank, (k, s) in enumerate(answers[q], 1):
            log(f"        {rank}. {s:+.3f}  {k}")
    (out / "queries.json").write_text(json.dumps(answers, indent=2))
    dt = time.perf_counter() - t0
    log(f"done in {dt:.0f} s; model in {run_dir}, metrics in {out / 'metrics.json'}")
    for line in next_steps(out):
        log(line)
    return DemoResult(out, metrics, answers, (audio_encoder, text_encoder), dt)


def next_steps(out_dir: str | Path) -> list[str]:
    """What to type next: index a folder with the demo's model and search it in the web page."""
    where = layout(out_dir)
    audio, lib, run = where["audio"], where["library"], where["run"]
    return [
        "",
        "Search these sounds in your browser (or put your own folder in place of the corpus):",
        f"  atae index {audio} --db {lib} --model {run}",
        f"  atae serve --db {lib}",
        "(`atae demo --serve` does both after the demo.)",
    ]


def demo_library(out_dir: str | Path, *, progress: bool = False):
    """The demo corpus indexed with the demo's trained model in ``OUT/library`` (incremental: a second
    call only opens it). Returns the open ``Library``."""
    from atae.library import Library

    where = layout(out_dir)
    lib = Library.open(where["library"], create=True, model=where["run"])
    lib.add([where["audio"]], progress=progress)
    return lib
