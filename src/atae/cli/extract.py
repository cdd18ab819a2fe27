"""`atae extract`: run the frozen towers once over a Clotho-format dataset and cache the sequences."""

from __future__ import annotations

import click

from atae.cli.options import device_option, ray_options
from atae.cli.output import echo, echo_lines


@click.command()
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Clotho-format captions CSV (file_name,caption_1..caption_N).")
@click.option("--audio-dir", required=True, type=click.Path(file_okay=False), help="Folder with the audio.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Feature store folder (created; reused and resumed if it exists).")
@click.option("--audio-encoder", default=None, help="Audio tower name (default: seed pair if its weights "
              "are installed, else aisfx).")
@click.option("--audio-weights", default=None, type=click.Path(dir_okay=False), help="Explicit weights file.")
@click.option("--text-encoder", default=None, help="Text tower name or local Hugging Face model folder "
              "(default: distilroberta-base with the seed pair, else minilm).")
@click.option("--text-weights", default=None, type=click.Path(), help="Explicit text weights.")
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Audio clips per committed batch (default 16 on a CPU, 64 on a GPU; text uses max(this, "
              "64)).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help='Where the audio tower runs: this process, or a Ray cluster '
              '(pip install "atae[distributed]").')
@ray_options
@device_option
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars (TTY only).")
def extract(csv_path, audio_dir, out, audio_encoder, audio_weights, text_encoder, text_weights, batch_size,
            engine, ray_address, workers, device, progress):
    """Extract and cache audio and caption embeddings for one dataset (resumable: run it again)."""
    from atae.data import read_caption_csv
    from atae.device import default_batch, resolve_device
    from atae.features import ensure_dataset_features
    from atae.towers.registry import get_towers

    dev = resolve_device(device)  # first: a device that is not there fails before any work
    dataset = read_caption_csv(csv_path, audio_dir)
    for p in dataset.problems:
        echo(f"warning: {p}", fg="yellow", err=True)
    audio_tower, text_tower = get_towers(audio_encoder, audio_weights, text_encoder, text_weights,
                                         device=str(dev))
    echo(f"towers: audio {audio_tower.info.key()}  text {text_tower.info.key()}  on {dev}")
    batch_size = batch_size or default_batch(dev, 16, 64)
    audio, text, report = ensure_dataset_features(dataset, audio_tower, text_tower, out, progress=progress,
                                                  batch_size=batch_size, engine=engine,
                                                  ray_address=ray_address, workers=workers)
    echo(f"{dataset.name}: {len(dataset.clips)} clips, "
               f"{sum(len(c.captions) for c in dataset.clips)} captions -> {out}")
    echo_lines(report.summary())
    echo(f"cached: {len(audio)} clips in {audio.folder}, {len(text)} captions in {text.folder}")


COMMANDS = [extract]
