"""`atae demo`: the main job on the embedded synthetic corpus."""

import click

from atae.cli.output import echo_lines


@click.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the corpus, features, trained model and metrics.")
@click.option("--seed", default=0, show_default=True, help="Seed for the corpus and the training.")
@click.option("--audio-encoder", default="aisfx", show_default=True)
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("--max-epochs", default=100, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(out_dir, seed, audio_encoder, text_encoder, max_epochs, no_progress):
    """Synthesise a corpus, extract, train ATAE, evaluate, and answer three example queries."""
    from atae.demo import run_demo

    run_demo(out_dir, seed=seed, audio_encoder=audio_encoder, text_encoder=text_encoder,
             max_epochs=max_epochs, progress=not no_progress, log=echo_lines)


COMMANDS = [demo]
