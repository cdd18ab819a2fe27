"""`atae tune`: choose the bridge temperature (and the hybrid weight) on a Clotho-format validation set.

* ``atae tune RUN --csv C --audio-dir D [--feats F] [--scorer hybrid|bridge]``: tune and store the values
  in RUN's config (``AlignedModel.extras``), where evaluate / search / the library read them.
* ``atae tune --scorer bridge --audio-encoder efficientat-mn04 --audio-weights W --csv C --audio-dir D
  [--json OUT]``: no model; print the best temperature (and write it with its curve to OUT).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from atae.cli.output import echo
from atae.errors import DataError


@click.command("tune")
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Clotho-format validation captions (file_name,caption_1..5).")
@click.option("--audio-dir", required=True, type=click.Path(file_okay=False), help="The audio folder.")
@click.option("--feats", default=None, type=click.Path(file_okay=False),
              help="Feature cache (default RUN/features, or ./atae-features without RUN).")
@click.option("--scorer", default=None, type=click.Choice(["bridge", "hybrid"]),
              help="bridge: the temperature only; hybrid: temperature and weight (default with RUN).")
@click.option("--audio-encoder", default=None, help="Without RUN: the tagging tower, e.g. efficientat-mn04.")
@click.option("--audio-weights", default=None, type=click.Path(dir_okay=False),
              help="Weights of the audio tower if not installed where atae finds them.")
@click.option("--text-encoder", default=None, help="Without RUN: the text tower (default minilm).")
@click.option("--text-weights", default=None, type=click.Path(), help="Weights of the text tower.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the chosen values and their validation curves to this JSON file.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars (TTY only).")
def tune(run, csv_path, audio_dir, feats, scorer, audio_encoder, audio_weights, text_encoder, text_weights,
         json_out, progress):
    """Tune the bridge temperature / hybrid weight on a validation set (stored in RUN if given)."""
    from atae import bridge as br
    from atae import scoring
    from atae.bridge import require_tag_head
    from atae.data import read_caption_csv
    from atae.features import ensure_dataset_features
    from atae.tuning import store_tuned, tune_on_dataset

    scorer = scorer or ("hybrid" if run else "bridge")
    model = None
    if run is not None:
        from atae.evaluate import towers_for_model
        from atae.model import AlignedModel

        model = AlignedModel.load(run)
        if audio_encoder is not None and audio_encoder != model.audio_info.name:
            raise DataError(f"the model was trained on audio tower {model.audio_info.name!r}, not "
                            f"{audio_encoder!r}", path=run, fix="leave out --audio-encoder")
        audio_tower, text_tower = towers_for_model(model, audio_weights=audio_weights,
                                                   text_weights=text_weights)
    else:
        if scorer == "hybrid":
            raise DataError("tuning the hybrid weight needs a trained model",
                            fix="pass RUN, or --scorer bridge")
        if audio_encoder is None:
            raise DataError("without RUN, --audio-encoder names the tagging tower",
                            fix="e.g. --audio-encoder efficientat-mn04 --audio-weights W")
        from atae.towers.registry import get_towers

        audio_tower, text_tower = get_towers(audio_encoder, audio_weights, text_encoder, text_weights)
    require_tag_head(audio_tower)
    ds = read_caption_csv(csv_path, audio_dir)
    for p in ds.problems[:20]:
        echo(f"warning: {p}", fg="yellow", err=True)
    feats = Path(feats) if feats else (Path(run) / "features" if run else Path("atae-features"))
    atab, ttab, _ = ensure_dataset_features(ds, audio_tower, text_tower, feats, progress=progress)
    tuned = tune_on_dataset(ds, atab, text_tower, model=model, text_table=ttab, scorer=scorer)
    temp = tuned[br.EXTRA_BRIDGE_TEMPERATURE]
    echo(f"{tuned['n_queries']} queries over {tuned['n_clips']} clips")
    echo("temperature  bridge mAP@10")
    for t, m in tuned["temperature_curve"]:
        echo(f"{t:>11g}  {m:.4f}" + ("  <- best" if t == temp else ""))
    if "weight_curve" in tuned:
        w = tuned[scoring.EXTRA_HYBRID_WEIGHT]
        echo("hybrid weight  mAP@10")
        for x, m in tuned["weight_curve"]:
            echo(f"{x:>13g}  {m:.4f}" + ("  <- best" if x == w else ""))
    best = f"best temperature: {temp:g}"
    if "weight_curve" in tuned:
        best += f", best hybrid weight: {tuned[scoring.EXTRA_HYBRID_WEIGHT]:g}"
    echo(best)
    if model is not None:
        store_tuned(model, tuned, run, data=str(csv_path))
        echo(f"stored in {Path(run) / 'config.json'} (libraries indexed with this model: run "
                   "`atae index` again to pick it up)")
    if json_out is not None:
        from atae.io import atomic_write_text

        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(json_out), json.dumps({"scorer": scorer, "data": str(csv_path),
                                                      "audio_tower": audio_tower.info.name,
                                                      "text_tower": text_tower.info.name, **tuned}, indent=2))
        echo(f"wrote {json_out}")


COMMANDS = [tune]
