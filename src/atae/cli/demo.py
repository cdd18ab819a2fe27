"""`atae demo`: the main job on the embedded synthetic corpus."""

import click

from atae.cli.output import echo, echo_lines


@click.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the corpus, features, trained model and metrics.")
@click.option("--seed", default=0, show_default=True, help="Seed for the corpus and the training.")
@click.option("--audio-encoder", default="aisfx", show_default=True)
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("--max-epochs", default=100, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--serve", "serve", is_flag=True,
              help="Then index the demo corpus with the trained model and open the search page on it.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the search page (with --serve).")
def demo(out_dir, seed, audio_encoder, text_encoder, max_epochs, no_progress, serve, port):
    """Synthesise a corpus, extract, train ATAE, evaluate, and answer three example queries."""
    from atae.demo import demo_library, run_demo

    run_demo(out_dir, seed=seed, audio_encoder=audio_encoder, text_encoder=text_encoder,
             max_epochs=max_epochs, progress=not no_progress, log=echo_lines)
    if not serve:
        return
    import sys

    from atae.server.run import serve_library

    echo("indexing the demo corpus for the search page...")
    lib = demo_library(out_dir, progress=not no_progress and sys.stderr.isatty())
    try:
        serve_library(lib, "127.0.0.1", port, log=echo, warn=lambda m: echo(m, fg="yellow", err=True))
    finally:
        lib.close()


COMMANDS = [demo]
