"""`atae train` and `atae evaluate`: thin wrappers over ``atae.train.train_from_files`` and
``atae.evaluate.evaluate_run``."""

from __future__ import annotations

import click

from atae.cli.options import device_option
from atae.cli.output import echo, echo_lines


@click.command()
@click.option("--recipe", required=True, help="atae | atae-et | atae-ep-f | atae-np-f | atae-infonce, "
              "or a recipe .toml file.")
@click.option("--train-csv", required=True, type=click.Path(dir_okay=False), help="Training captions CSV.")
@click.option("--train-audio", required=True, type=click.Path(file_okay=False), help="Training audio folder.")
@click.option("--val-csv", required=True, type=click.Path(dir_okay=False), help="Validation captions CSV.")
@click.option("--val-audio", required=True, type=click.Path(file_okay=False), help="Validation audio folder.")
@click.option("--noisy-json", default=None, type=click.Path(dir_okay=False),
              help="FSD50K clip-info JSON (noisy pairs for the -et/-ep-f/-np-f recipes).")
@click.option("--noisy-audio", default=None, type=click.Path(file_okay=False),
              help="Audio of the noisy pairs; alone (no --noisy-json): self-tagged pairs from this folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder (model, log, checkpoints). Run the same command again to resume.")
@click.option("--audio-encoder", default=None, help="Audio tower (default: the seed pair if installed, "
              "else aisfx).")
@click.option("--audio-weights", default=None, type=click.Path(dir_okay=False), help="Explicit weights file.")
@click.option("--text-encoder", default=None, help="Text tower or local Hugging Face model folder.")
@click.option("--text-weights", default=None, type=click.Path(), help="Explicit text weights.")
@click.option("--feats", default=None, type=click.Path(file_okay=False),
              help="Feature cache (default OUT/features); share it between runs to extract once.")
@click.option("--seed", default=None, type=int, help="Random seed (default: the recipe's, 0).")
@click.option("--max-epochs", default=None, type=click.IntRange(1), help="Upper bound on epochs per stage.")
@click.option("--loss", default=None, type=click.Choice(["seed", "infonce"]),
              help="Override the recipe's loss.")
@click.option("--restart", is_flag=True, help="Discard an earlier run in --out instead of resuming it.")
@device_option
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars (TTY only).")
def train(recipe, train_csv, train_audio, val_csv, val_audio, noisy_json, noisy_audio, out, audio_encoder,
          audio_weights, text_encoder, text_weights, feats, seed, max_epochs, loss, restart, device,
          progress):
    """Train the adapters with a recipe (features are extracted and cached on the way)."""
    from atae.train import train_from_files

    train_from_files(recipe, train_csv=train_csv, train_audio=train_audio, val_csv=val_csv,
                     val_audio=val_audio, out=out, noisy_json=noisy_json, noisy_audio=noisy_audio,
                     audio_encoder=audio_encoder, audio_weights=audio_weights, text_encoder=text_encoder,
                     text_weights=text_weights, feats=feats, seed=seed, max_epochs=max_epochs, loss=loss,
                     restart=restart, progress=progress, echo=echo_lines, device=device)


@click.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Clotho-format captions CSV: DCASE 2022 evaluation (every caption one query).")
@click.option("--queries", default=None, type=click.Path(dir_okay=False),
              help="DCASE 2025 query file (query,audio_filenames): multi-positive evaluation over all "
                   "audio files under --audio-dir.")
@click.option("--audio-dir", required=True, type=click.Path(file_okay=False), help="The audio folder.")
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False), help="Metrics JSON.")
@click.option("--submission", default=None, type=click.Path(dir_okay=False),
              help="Also write a DCASE submission CSV (caption,file_name_1..10).")
@click.option("--scorer", default="adapter", show_default=True,
              type=click.Choice(["adapter", "bridge", "hybrid"]),
              help="adapter: the trained model; bridge: zero-shot AudioSet tags (no RUN needed); "
                   "hybrid: both.")
@click.option("--feats", default=None, type=click.Path(file_okay=False),
              help="Feature cache (default RUN/features, or ./atae-features without RUN).")
@click.option("--audio-encoder", default=None,
              help="Only without RUN (--scorer bridge): the tagging tower, e.g. efficientat-mn04.")
@click.option("--audio-weights", default=None, type=click.Path(dir_okay=False),
              help="Weights of the audio tower if not installed where atae finds them.")
@click.option("--text-encoder", default=None, help="Only without RUN: the text tower (default minilm).")
@click.option("--text-weights", default=None, type=click.Path(), help="Weights of the text tower.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Bridge softmax temperature (default: the model's tuned value, else the bridge default).")
@device_option
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars (TTY only).")
def evaluate(run, csv_path, queries, audio_dir, json_out, submission, scorer, feats, audio_encoder,
             audio_weights, text_encoder, text_weights, temperature, device, progress):
    """Evaluate RUN (or a zero-shot scorer) on a caption CSV (DCASE 2022) or a query file (DCASE 2025)."""
    from atae.evaluate import evaluate_run, format_metrics

    res = evaluate_run(run, audio_dir=audio_dir, json_out=json_out, csv=csv_path, queries=queries,
                       submission=submission, feats=feats, scorer=scorer, audio_encoder=audio_encoder,
                       audio_weights=audio_weights, text_encoder=text_encoder, text_weights=text_weights,
                       temperature=temperature, progress=progress, device=device)
    for p in res.problems[:20]:
        echo(f"warning: {p}", fg="yellow", err=True)
    if len(res.problems) > 20:
        echo(f"warning: ... and {len(res.problems) - 20} more (see {json_out})", fg="yellow", err=True)
    echo(f"{res.mode} ({scorer}): {len(res.queries)} queries over {len(res.candidates)} clips")
    echo_lines(format_metrics(res.metrics))
    echo(f"metrics -> {json_out}" + (f", submission -> {submission}" if submission else ""))


COMMANDS = [train, evaluate]
