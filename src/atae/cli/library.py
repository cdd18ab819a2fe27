"""`atae index`, `atae prune` and `atae serve`: build/update a sound library, drop files that are gone,
and browse it in a web page."""

from __future__ import annotations

import click

from atae.cli.options import device_option, ray_options
from atae.cli.output import echo, echo_json


@click.command("index")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--db",
    "db",
    required=True,
    type=click.Path(file_okay=False),
    help="Library folder (created if missing; updated incrementally if it exists).",
)
@click.option(
    "--model",
    default=None,
    type=click.Path(file_okay=False),
    help="Trained model folder (`atae train --out RUN`): enables text search. Changing it re-embeds "
    "the stored tower outputs without re-running the tower.",
)
@click.option(
    "--audio-encoder",
    default=None,
    help="Audio tower of a new library (default: the model's, else the strongest installed: "
    "efficientat-mn04, cnn14, aisfx; see `atae info`).",
)
@click.option(
    "--audio-weights", default=None, type=click.Path(dir_okay=False), help="Explicit tower weights."
)
@click.option(
    "--window",
    "window_s",
    default=None,
    type=click.FloatRange(min=0.5),
    help="Window length (s) for files longer than --long (default 10; fixed at creation).",
)
@click.option(
    "--hop", "hop_s", default=None, type=click.FloatRange(min=0.1), help="Window hop (s) (default 5)."
)
@click.option(
    "--long",
    "long_s",
    default=None,
    type=click.FloatRange(min=1.0),
    help="Files up to this many seconds are one segment; longer ones are windowed (default 30).",
)
@click.option(
    "--ext",
    default=None,
    help="Comma-separated extension allow-list (default: every audio format "
    "this machine decodes, e.g. wav,flac,ogg,aiff).",
)
@click.option(
    "--index",
    "index_kind",
    default=None,
    type=click.Choice(["auto", "flat", "hnsw"]),
    help="Vector index: exact (flat) or HNSW; auto = HNSW above 50,000 segments (default).",
)
@click.option(
    "--store",
    default=None,
    type=click.Choice(["faiss", "lance"]),
    help="Where the vectors live: faiss (default, in memory) or lance (a LanceDB table on disk, "
    'for tens of millions of segments; pip install "atae[distributed]"). Switching rebuilds them.',
)
@device_option
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where files are encoded: this process, or a Ray cluster "
              '(pip install "atae[distributed]"); this process decides and commits either way.')
@ray_options
@click.option("--wait", is_flag=True, help="If another process is indexing this library, wait for it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar (TTY only).")
def index(
    dirs,
    db,
    model,
    audio_encoder,
    audio_weights,
    window_s,
    hop_s,
    long_s,
    ext,
    index_kind,
    store,
    device,
    engine,
    ray_address,
    workers,
    wait,
    as_json,
    progress,
):
    """Index folders of audio into the library at --db (incremental, resumable: run it again anytime)."""
    import sys
    from pathlib import Path

    from atae.library import Library

    if audio_encoder is None and model is None and not (Path(db).expanduser() / "library.sqlite").exists():
        from atae.towers.registry import best_audio_tower

        audio_encoder = best_audio_tower()
        if audio_encoder != "efficientat-mn04":
            gain = ("a tower as strong and eight times faster" if audio_encoder == "cnn14" else
                    "a stronger tower with AudioSet tags: text search with no training, and tags that "
                    "explain each result")
            echo(
                f"note: indexing with the {audio_encoder} audio tower; `atae weights fetch efficientat-mn04` "
                f"(4 MB) gives {gain} (then index into a new --db)",
                fg="yellow",
                err=True,
            )
    with Library.open(
        db,
        create=True,
        audio_encoder=audio_encoder,
        audio_weights=audio_weights,
        model=model,
        window_s=window_s,
        hop_s=hop_s,
        long_s=long_s,
        index=index_kind,
        store=store,
        device=device,
    ) as lib:
        rep = lib.add(list(dirs), exts=ext, progress=progress and sys.stderr.isatty(), wait=wait,
                      engine=engine, ray_address=ray_address, workers=workers)
        stats = lib.stats()
    if as_json:
        echo_json({"report": rep.to_dict(), "library": stats})
        return
    echo(rep.summary())
    echo(
        f"library: {stats['files']} files, {stats['segments']} segments, {stats['hours']:.2f} h, "
        f"index {stats['index']} ({stats['store']}), space {stats['space']}"
    )
    _list_some(f"{len(rep.failed)} unreadable file(s) (kept out of the index; fixed files are retried):",
               rep.failed)
    _list_some(f"{len(rep.not_scanned)} path(s) not looked at:", rep.not_scanned)
    for path, why in rep.skipped[:25]:
        echo(f"  skipped {path}: {why}", fg="yellow", err=True)
    if rep.previously_failed:
        echo(
            f"{rep.previously_failed} file(s) failed in an earlier run and are unchanged (not retried).",
            err=True,
        )
    if rep.missing_elsewhere:
        echo(
            f"{rep.missing_elsewhere} indexed file(s) lie in folders that no longer exist (e.g. "
            f"{rep.missing_example}): `atae prune --db {db}` removes them",
            fg="yellow",
            err=True,
        )


@click.command("prune")
@click.option(
    "--db", "db", required=True, type=click.Path(file_okay=False, exists=True), help="Library folder."
)
@click.option("--dry-run", is_flag=True, help="Only list the files that would be removed.")
@click.option("--wait", is_flag=True, help="If another process is indexing this library, wait for it.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed paths as JSON.")
def prune(db, dry_run, wait, as_json):
    """Remove files that are no longer on disk (e.g. under a renamed or deleted folder) from the library.
    Files that exist but cannot be checked (permissions) are kept; a drive that is not mounted looks
    gone, so look with --dry-run first."""
    from atae.library import Library

    with Library.open(db) as lib:
        gone = lib.prune(dry_run=dry_run, wait=wait)
    if as_json:
        echo_json({"dry_run": dry_run, "removed": gone})
        return
    for p in gone:
        echo(f"  {p}")
    verb = "would remove" if dry_run else "removed"
    echo(f"{verb} {len(gone)} file(s) no longer on disk")


@click.command("serve")
@click.option(
    "--db", "db", required=True, type=click.Path(file_okay=False, exists=True), help="Library folder."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="Another name this server may be reached by (the Host header), e.g. a name in /etc/hosts; "
    "repeat for several. Requests naming any other host are refused (DNS rebinding).",
)
@click.option(
    "--max-upload-mb",
    default=50,
    show_default=True,
    type=click.IntRange(1, 2048),
    help="Largest example sound accepted for query by example.",
)
@device_option
def serve(db, host, port, allow_hosts, max_upload_mb, device):
    """Serve a search page for the library at --db (search box, players, waveforms, query by example)."""
    from atae.library import Library
    from atae.server.run import serve_library

    lib = Library.open(db, device=device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(
            f"warning: listening on {host}: anyone who can reach it can search and play your files",
            fg="yellow",
            err=True,
        )
    try:
        serve_library(lib, host, port, max_upload_bytes=max_upload_mb * 1024 * 1024, allow_hosts=allow_hosts,
                      log=echo, warn=lambda m: echo(m, fg="yellow", err=True))
    finally:
        lib.close()


def _list_some(header: str, pairs, most: int = 25) -> None:
    """A yellow header and the first ``most`` (path, why) lines on stderr; nothing when there are none."""
    if not pairs:
        return
    echo(header, fg="yellow", err=True)
    for path, why in pairs[:most]:
        echo(f"  {path}: {why}", err=True)
    if len(pairs) > most:
        echo(f"  ... and {len(pairs) - most} more (--json lists all)", err=True)


COMMANDS = [index, prune, serve]
