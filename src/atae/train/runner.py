"""Running a recipe: every stage, the saved model, tuning and the log; ``atae train`` from files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from atae.device import resolve_device
from atae.errors import DataError, ModelError
from atae.features import caption_key
from atae.io import atomic_write_text
from atae.losses import make_loss
from atae.model import AlignedModel
from atae.printable import escape
from atae.train.data import TrainData, ValData, embed_packed
from atae.train.loop import StageResult, plot_learning_curve, seed_everything, train_stage
from atae.train.recipe import Recipe, load_recipe, load_recipe_from

LOG_NAME = "log.jsonl"
CURVE_NAME = "learning_curve.png"
# training captions kept for the hybrid's novelty gate: every caption of small sets such as ESC-50's, a
# seeded sample of Clotho's 19k (the gate's threshold is set against the same sample, and comparing a
# query with 4k captions costs a fraction of a millisecond, 20k several)
MAX_REFERENCE = 4096


@dataclass
class RunResult:
    model: AlignedModel
    out_dir: Path
    stages: list[StageResult]
    summary: dict


def _as_source(x, audio_table, text_table):
    """A CaptionDataset (uses the default tables) or a (dataset, audio_table, text_table) triple."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return x
    return (x, audio_table, text_table)


def run_recipe(recipe: Recipe | str, clean_train, clean_val, noisy, audio_table, text_table, out_dir, *,
               resume: bool = True, restart: bool = False, progress: bool = False,
               on_epoch: Callable[[dict], None] | None = None, text_tower=None,
               stage_epochs: Sequence[int] | None = None, weights_files: dict | None = None,
               device: str = "cpu", **overrides) -> RunResult:
    """Run every stage of a recipe and save the final model (best weights of the last stage) in
    ``out_dir``. ``clean_train``/``clean_val``/``noisy`` are CaptionDatasets (or (dataset, audio_table,
    text_table) triples when a source lives in other tables); ``noisy`` may be None for the ``atae`` recipe.

    ``clean_val=None`` trains every stage for exactly ``max_epochs`` epochs and keeps the last weights;
    ``stage_epochs`` gives each stage its own ``max_epochs`` (a refit for counts chosen earlier).
    Running the same call again resumes from the last checkpoint (``resume``); ``restart=True`` discards
    an earlier run in ``out_dir`` first. ``overrides`` replace TrainConfig fields (seed, max_epochs, loss).
    ``device``: where the adapters train (``atae.device``; batches are gathered on the CPU). With a
    tagging audio tower the hybrid's weight and gate are then tuned on ``clean_val`` and stored in the
    model's extras (``atae.tuning``; ``text_tower``: the tower the text table came from).
    ``weights_files``: the towers' weights paths (``tower_weights_files``), kept in the model.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        recipe = load_recipe_from(recipe, **overrides)
    cfg = recipe.train
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError("output path exists and is not a folder", path=out, fix="choose another --out")
    if restart:
        for name in ("stages", "config.json", "adapters.safetensors", LOG_NAME, CURVE_NAME):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    sources = {"clean": _as_source(clean_train, audio_table, text_table),
               "noisy": _as_source(noisy, audio_table, text_table)}
    if recipe.needs_noisy and sources["noisy"] is None:
        raise DataError(f"recipe {recipe.name!r} needs noisy pairs",
                        fix="pass --noisy-json J --noisy-audio D (FSD50K), or use the `atae` recipe")
    val_src = _as_source(clean_val, audio_table, text_table)
    val = ValData.build(*val_src) if val_src is not None else None
    audio_info, text_info = audio_table.info, text_table.info

    seed_everything(cfg.seed)
    dev = resolve_device(device)
    model = AlignedModel(audio_info, text_info, hidden=cfg.hidden, out_dim=cfg.out_dim).to(dev)
    model.weights_files = dict(weights_files or {})
    loss_fn = make_loss(cfg.loss, **cfg.loss_params).to(dev)
    histories: dict[int, list[dict]] = {}

    def write_log(i: int, hist: list[dict]) -> None:
        histories[i] = hist
        lines = [json.dumps(r) for k in sorted(histories) for r in histories[k]]
        atomic_write_text(out / LOG_NAME, "\n".join(lines) + ("\n" if lines else ""))

    if stage_epochs is not None and len(stage_epochs) != len(recipe.stages):
        raise ModelError(f"{len(stage_epochs)} epoch counts for the {len(recipe.stages)} stages of "
                         f"recipe {recipe.name!r}", fix="give one count per stage")
    results, texts = [], []
    for i, stage in enumerate(recipe.stages):
        data = TrainData.build([sources[s] for s in stage.data])
        texts.append(data.text)
        stage_cfg = cfg if stage_epochs is None else replace(cfg, max_epochs=int(stage_epochs[i]))
        res = train_stage(model, loss_fn, data, val, stage_cfg, out / "stages" / f"{i + 1}-{stage.name}",
                          stage_idx=i, stage_name=stage.name, resume=resume or restart, progress=progress,
                          on_epoch=on_epoch, on_history=lambda h, i=i: write_log(i, h))
        write_log(i, res.history)
        results.append(res)
    summary = {
        "recipe": recipe.to_dict(),
        "loss": (loss_fn.extra_state_summary() if hasattr(loss_fn, "extra_state_summary")
                 else {"name": cfg.loss}),
        "stages": [{"name": r.name, "data": s.data, "pairs": r.n_pairs, "best_epoch": r.best_epoch,
                    "epochs_run": r.epochs_run, "best_val_mAP@10": r.best_score, "stopped": r.stopped}
                   for r, s in zip(results, recipe.stages, strict=True)],
        "val_fingerprint": None if val is None else val.fingerprint,
    }
    model.train_summary = summary
    model.caption_reference = caption_reference(model, texts)
    model.save(out)
    from atae.tuning import tune_after_training

    summary["tuning"] = ({"skipped": "no validation set"} if val_src is None
                         else tune_after_training(model, val_src, out, text_tower=text_tower))
    try:
        plot_learning_curve([r for k in sorted(histories) for r in histories[k]], out / CURVE_NAME)
    except Exception as e:  # noqa: BLE001 - a missing plot must never lose a trained model
        summary["plot_error"] = str(e)
    return RunResult(model, out, results, summary)


def tower_weights_files(audio_tower, text_tower) -> dict[str, str]:
    """{"audio": path, "text": path} of the weights the towers loaded (``AlignedModel.weights_files``)."""
    out = {}
    for kind, tower in (("audio", audio_tower), ("text", text_tower)):
        p = getattr(tower, "weights_path", None) or getattr(tower, "model_dir", None)
        if p is not None:
            out[kind] = str(Path(p).expanduser().resolve())
    return out


def caption_reference(model: AlignedModel, texts, cap: int = MAX_REFERENCE) -> np.ndarray:
    """The distinct unit text-adapter embeddings of the captions the model was trained on (every stage),
    at most ``cap`` of them (a seeded sample beyond): ``AlignedModel.caption_reference``."""
    emb = np.concatenate([embed_packed(model.text_adapter, t).numpy() for t in texts])
    emb = np.unique(emb, axis=0)
    if len(emb) > cap:
        emb = emb[np.sort(np.random.default_rng(0).choice(len(emb), cap, replace=False))]
    return emb  # the model holds it in float16


# ------------------------------------------------------------------------------ command plumbing
def train_from_files(recipe: str | Path, *, train_csv, train_audio, val_csv, val_audio, out,
                     noisy_json=None, noisy_audio=None, audio_encoder: str | None = None, audio_weights=None,
                     text_encoder: str | None = None, text_weights=None, feats=None, seed: int | None = None,
                     max_epochs: int | None = None, loss: str | None = None, restart: bool = False,
                     progress: bool = True, echo: Callable[[str], None] = print,
                     device: str = "auto") -> RunResult:
    """``atae train``: read the datasets, build the towers, extract (cached, resumable) and run a recipe.

    Noisy pairs: ``noisy_json`` + ``noisy_audio`` read FSD50K's clip-info JSON (half of the clips, the
    seed's rule); ``noisy_audio`` alone self-tags every audio file of the folder with the audio tower's
    AudioSet head (needs a tower with tags). Features go to ``feats`` (default ``out/features``).
    """
    from atae.data import read_caption_csv, read_fsd50k_noisy
    from atae.features import ensure_dataset_features
    from atae.towers.registry import get_towers

    dev = resolve_device(device)  # first: a device that is not there fails before any work
    rec = load_recipe(recipe, seed=seed, max_epochs=max_epochs, loss=loss)
    if rec.needs_noisy and noisy_audio is None:
        raise DataError(f"recipe {rec.name!r} needs noisy pairs",
                        fix="pass --noisy-json J --noisy-audio D (FSD50K), or --noisy-audio D alone "
                            "(self-tagged), or use --recipe atae")
    if noisy_json is not None and noisy_audio is None:
        raise DataError("--noisy-json needs --noisy-audio (the folder of <clip_id>.wav)", path=noisy_json)
    out = Path(out)
    feats = Path(feats) if feats is not None else out / "features"
    clean = read_caption_csv(train_csv, train_audio)
    val = read_caption_csv(val_csv, val_audio)
    for ds in (clean, val):
        for p in ds.problems:
            echo(f"warning: {escape(p)}")
    audio_tower, text_tower = get_towers(audio_encoder, audio_weights, text_encoder, text_weights,
                                         device=str(dev))
    echo(f"towers: audio {audio_tower.info.name} ({audio_tower.info.key()}), "
         f"text {text_tower.info.name} ({text_tower.info.key()}) on {dev}")
    atab = ttab = None
    for ds in (clean, val):
        atab, ttab, report = ensure_dataset_features(ds, audio_tower, text_tower, feats, progress=progress)
        echo(f"features {ds.name}: {report.summary()}")
    noisy = None
    if rec.needs_noisy:
        if noisy_json is not None:
            noisy = read_fsd50k_noisy(noisy_json, noisy_audio)
            for p in noisy.problems[:20]:
                echo(f"warning: {escape(p)}")
            atab, ttab, report = ensure_dataset_features(noisy, audio_tower, text_tower, feats,
                                                         progress=progress)
            echo(f"features {noisy.name}: {report.summary()}")
        else:
            noisy = _self_tagged(noisy_audio, audio_tower, text_tower, feats, progress, echo)
            for p in noisy[0].problems[:20]:
                echo(f"warning: {escape(p)}")
            from atae.features import FeatureStore

            # the clean sets' tables, re-opened so they include everything extracted so far
            store = FeatureStore(feats)
            atab, ttab = store.audio_table(audio_tower.info), store.text_table(text_tower.info)
    elif noisy_audio is not None:
        echo(f"note: recipe {rec.name!r} has no noisy stage; --noisy-* ignored")
    result = run_recipe(rec, clean, val, noisy, atab, ttab, out, restart=restart, progress=progress,
                        text_tower=text_tower, weights_files=tower_weights_files(audio_tower, text_tower),
                        device=str(dev))
    for st in result.stages:
        echo(f"stage {st.name}: {st.n_pairs} pairs, {st.epochs_run} epochs, best val mAP@10 "
             f"{st.best_score:.4f} at epoch {st.best_epoch} ({st.stopped})")
    tuning = result.summary.get("tuning") or {}
    if "skipped" not in tuning:
        echo("tuned on validation: " + ", ".join(f"{k} {v:g}" for k, v in tuning.items()))
    echo(f"model saved to {out}")
    return result


def _self_tagged(noisy_audio, audio_tower, text_tower, feats, progress, echo):
    """Noisy pairs from an uncaptioned folder: extract its audio once, then caption each clip with its
    top AudioSet tags read from the cached features (the tower does not run twice).

    Returns a (dataset, audio_table, text_table) source whose pseudo-caption features live in their own
    store (``feats/selftag``): the clips may also be in a captioned dataset under the same keys, and the
    text key ``clip#0`` would otherwise name that dataset's first caption."""
    from atae.data import folder_dataset
    from atae.features import FeatureStore, ensure_dataset_features, extract_text
    from atae.selftag import self_tagged_dataset

    root = Path(noisy_audio)
    atab, _, report = ensure_dataset_features(folder_dataset(root), audio_tower, text_tower, feats,
                                              progress=progress)
    echo(f"features {root.name} (audio): {report.summary()}")

    def tags_for(path: Path):
        key = path.relative_to(root).as_posix()
        return atab.tags(key) if key in atab else None

    ds = self_tagged_dataset(root, audio_tower, progress=progress, tags_for=tags_for)
    ttab = FeatureStore(Path(feats) / "selftag").text_table(text_tower.info)
    items = [(caption_key(c.key, i), cap) for c in ds.clips for i, cap in enumerate(c.captions)]
    rep = extract_text(ttab, text_tower, items, progress=progress)
    echo(f"features {ds.name} (pseudo-captions): {rep.summary()}")
    return ds, atab, ttab
