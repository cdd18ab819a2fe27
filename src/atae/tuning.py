"""Tune the zero-shot bridge's temperature and the hybrid's fusion on a validation set, and store them.

Why: whoever searches later (``atae evaluate``, ``atae search``, a library, the web page) gets the values
without knowing they exist. They live in the model directory's ``config.json`` (``AlignedModel.extras``:
``atae.bridge.EXTRA_BRIDGE_TEMPERATURE``, ``atae.scoring.EXTRA_HYBRID_WEIGHT`` and ``EXTRA_HYBRID_GATE``);
a model without them uses the defaults.

Procedure (DCASE 2022 layout: every caption queries all validation clips, its own clip relevant):
1. temperature (``atae tune`` only): the ``TEMPERATURE_GRID`` value with the best bridge mAP@10;
2. weight: with the bridge at that temperature, the ``WEIGHT_GRID`` value with the best hybrid mAP@10.
   Ties go to the first grid value.
3. gate: the least closeness to the training captions among the validation queries (``Fusion``).

``atae train`` runs steps 2-3 after training when the audio tower has an AudioSet head. It keeps the
bridge's default temperature, which was chosen on varied dev data: validation captions are like the
training captions, and a temperature tuned on them (e.g. ESC-50 class names) suits the bridge to the
adapter's domain, the very queries it needs the bridge least for. ``atae tune`` re-runs every step on
any Clotho-format validation set (without a model, only the temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atae import bridge as br
from atae import scoring
from atae.errors import DataError

EXTRA_TUNED_ON = "tuned_on"  # extras key: what the values were tuned on (data, queries, mAP@10)
WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))


def mean_ap_at_k(scores: np.ndarray, relevant: Sequence, k: int = 10) -> float:
    """Mean AP@k (``atae.metrics.per_query_multi``): with one relevant clip per query (an int) this is the
    DCASE 2022 mAP@10 (1/rank within the top k); with several, DCASE 2025's multi-positive AP."""
    from atae.metrics import per_query_multi

    sets = [np.atleast_1d(np.asarray(r, dtype=np.int64)) for r in relevant]
    return float(per_query_multi(scores, sets, k=k, k_list=())[f"mAP@{k}"].mean())


def temperature_curve(cos: np.ndarray, relevant: Sequence, feats: np.ndarray,
                      grid: Sequence[float] = br.TEMPERATURE_GRID, k: int = 10) -> list[tuple[float, float]]:
    """[(temperature, bridge mAP@k)] over ``grid`` from (Q, 527) query-label cosines (one text pass) and
    the clips' ``bridge.tag_features``."""
    return [(float(t), mean_ap_at_k(br.softmax_rows(cos, t) @ feats.T, relevant, k)) for t in grid]


def hybrid_weight_curve(adapter_scores: np.ndarray, bridge_scores: np.ndarray, relevant: Sequence,
                        grid: Sequence[float] = WEIGHT_GRID, k: int = 10) -> list[tuple[float, float]]:
    """[(weight, hybrid mAP@k)] over ``grid``."""
    return [(float(w), mean_ap_at_k(scoring.hybrid_scores(adapter_scores, bridge_scores, w), relevant, k))
            for w in grid]


def tune_hybrid_weight(adapter_scores: np.ndarray, bridge_scores: np.ndarray, relevant: Sequence,
                       grid: Sequence[float] = WEIGHT_GRID, k: int = 10) -> float:
    """The grid weight with the best validation mAP@k (ties: the first in grid order)."""
    curve = hybrid_weight_curve(adapter_scores, bridge_scores, relevant, grid, k)
    return max(curve, key=lambda wm: wm[1])[0]


def has_tags(audio_table, keys) -> bool:
    """True when every one of ``keys`` has stored AudioSet tags (a tower with an AudioSet head)."""
    keys = list(keys)
    return bool(keys) and all(audio_table.tags(k) is not None for k in keys)


def _queries(dataset, audio_table, text_table):
    from atae.features import dataset_queries

    if text_table is not None:
        cands, texts, tkeys, rel, _ = dataset_queries(dataset, audio_table, text_table)
        return cands, texts, [np.asarray(text_table.get(k)) for k in tkeys], rel
    cands, texts, rel = [], [], []
    for c in dataset.clips:
        if c.key in audio_table:
            for cap in c.captions:
                texts.append(cap)
                rel.append(len(cands))
            cands.append(c.key)
    return cands, texts, None, rel


def tune_on_dataset(dataset, audio_table, text_tower, *, model=None, text_table=None,
                    scorer: str = "hybrid", k: int = 10, temperature: bool = True) -> dict:
    """Tune on a caption dataset whose audio features (with tags) are in ``audio_table``.

    ``text_tower``: the model's text tower (the bridge reads its last layer); ``text_table``: cached
    token sequences for the adapter (else ``text_tower`` encodes the captions). ``scorer="bridge"`` tunes
    only the temperature (no model needed); ``temperature=False`` keeps the model's (or the default).
    The hybrid's novelty gate is set to the least close validation query (``atae.scoring.Fusion``) when
    the model holds its training captions. Returns ``{EXTRA_BRIDGE_TEMPERATURE, [EXTRA_HYBRID_WEIGHT,
    EXTRA_HYBRID_GATE], "temperature_curve", ["weight_curve"], "n_queries", "n_clips"}``."""
    from atae.evaluate import encode_texts

    if scorer not in ("bridge", "hybrid"):
        raise DataError(f"cannot tune scorer {scorer!r}", fix="use bridge or hybrid")
    if scorer == "hybrid" and model is None:
        raise DataError("tuning the hybrid weight needs a trained model", fix="pass RUN, or --scorer bridge")
    cands, texts, seqs, rel = _queries(dataset, audio_table, text_table)
    if not texts:
        raise DataError(f"validation set {getattr(dataset, 'name', '')!r} has no usable caption",
                        fix="check --csv/--audio-dir and the extraction report")
    if not has_tags(audio_table, cands):
        raise DataError("the validation clips have no AudioSet tags: the audio tower has no AudioSet head",
                        fix="use a tagging tower (efficientat-mn04, cnn14)")
    tb = br.TagBridge(text_tower)
    tags = tb.clip_tags([audio_table.tags(c) for c in cands])
    cos = tb.cosines(texts)
    grid = br.TEMPERATURE_GRID if temperature else (br.bridge_temperature(model),)
    feats = br.tag_features(tags)
    t_curve = temperature_curve(cos, rel, feats, grid, k=k)  # cos and feats are reused below
    temp = max(t_curve, key=lambda tm: tm[1])[0]
    out = {br.EXTRA_BRIDGE_TEMPERATURE: temp, "temperature_curve": t_curve,
           "n_queries": len(texts), "n_clips": len(cands)}
    if scorer == "hybrid":
        bridge_scores = br.softmax_rows(cos, temp) @ feats.T
        if seqs is None:
            seqs = encode_texts(text_tower, texts)
        text_vectors = model.encode_text(seqs)
        audio = [audio_table.get(c) for c in cands]
        adapter = scoring.adapter_scores(model, audio, text_vectors=text_vectors)
        w_curve = hybrid_weight_curve(adapter, bridge_scores, rel, k=k)
        out[scoring.EXTRA_HYBRID_WEIGHT] = max(w_curve, key=lambda wm: wm[1])[0]
        out["weight_curve"] = w_curve
        gate = gate_threshold(model, text_vectors)
        if gate is not None:
            out[scoring.EXTRA_HYBRID_GATE] = gate
    return out


def gate_threshold(model, text_vectors: np.ndarray) -> float | None:
    """The hybrid's novelty gate for a model: the least closeness to its training captions among the
    validation queries (their unit text-adapter vectors); None for a model without a caption reference."""
    reference = getattr(model, "caption_reference", None)
    if reference is None or not len(reference) or not len(text_vectors):
        return None
    return float(scoring.closeness(text_vectors, reference).min())


def store_tuned(model, tuned: dict, out_dir, *, data: str | None = None) -> None:
    """Write the tuned values into ``model.extras`` and re-save the model in ``out_dir``."""
    for key in (br.EXTRA_BRIDGE_TEMPERATURE, scoring.EXTRA_HYBRID_WEIGHT, scoring.EXTRA_HYBRID_GATE):
        if key in tuned:
            model.extras[key] = float(tuned[key])
    best_t = dict(tuned["temperature_curve"]).get(tuned[br.EXTRA_BRIDGE_TEMPERATURE])
    info = {"data": data, "n_queries": tuned["n_queries"], "n_clips": tuned["n_clips"],
            "bridge_mAP@10": best_t}
    if "weight_curve" in tuned:
        info["hybrid_mAP@10"] = dict(tuned["weight_curve"]).get(tuned[scoring.EXTRA_HYBRID_WEIGHT])
    model.extras[EXTRA_TUNED_ON] = info
    model.save(Path(out_dir))


def tune_after_training(model, val_src, out_dir, *, text_tower=None) -> dict:
    """The post-training hook of ``run_recipe``: tune and store when the validation clips have tags.

    Returns a small summary for the run's ``train_summary`` (``{"skipped": why}`` when the tower has no
    AudioSet head or the text tower cannot be rebuilt; a trained model is never lost over tuning)."""
    dataset, audio_table, text_table = val_src
    keys = [c.key for c in dataset.clips if c.key in audio_table]
    if not has_tags(audio_table, keys):
        return {"skipped": "the audio tower has no AudioSet head"}
    try:
        if text_tower is None:
            from atae.towers.trained_with import text_tower_for

            text_tower = text_tower_for(model.text_info, remembered=model.weights_files.get("text"))
        tuned = tune_on_dataset(dataset, audio_table, text_tower, model=model, text_table=text_table,
                                temperature=False)
    except Exception as e:  # noqa: BLE001 - tuning is an extra; the trained model is already saved
        return {"skipped": f"{type(e).__name__}: {e}"}
    store_tuned(model, tuned, out_dir, data=getattr(dataset, "name", None))
    return {k: tuned[k] for k in (br.EXTRA_BRIDGE_TEMPERATURE, scoring.EXTRA_HYBRID_WEIGHT,
                                  scoring.EXTRA_HYBRID_GATE) if k in tuned}
