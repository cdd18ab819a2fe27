"""`atae search`: rank sounds for a description (or an example sound).

Two modes:
* library: ``atae search --db LIB "a door creaks open" [-k 10] [--json] [--paths-only | --print0]
  [--audio clip.wav] [--min-duration S] [--max-duration S] [--glob PATTERN] [--explain]``, or more like
  an indexed file: ``atae search --db LIB --like PATH[@SECONDS]``
* dataset: ``atae search RUN "a door creaks open" --csv C --audio-dir D [-k 10]`` ranks the clips of a
  Clotho-format dataset with the trained model RUN (audio features cached in ``--feats``).

Output: the table and ``--json`` escape control characters in names (``atae.cli.output``);
``--paths-only`` prints one path a line and refuses a result whose name holds a newline or another
control character (a script would read a wrong path), pointing to ``--print0``, which writes the exact
paths separated by NUL bytes (``xargs -0``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from atae.cli.output import echo, echo_json
from atae.errors import QueryError
from atae.printable import escape, is_clean


@click.command("search")
@click.argument("args", nargs=-1)
@click.option("--db", default=None, type=click.Path(file_okay=False), help="Library folder (`atae index`).")
@click.option(
    "--audio",
    "audio",
    default=None,
    type=click.Path(dir_okay=False),
    help="Query by example: rank by similarity to this sound.",
)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Results.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--paths-only", is_flag=True,
              help="Print only the paths, best first, one a line (for scripts).")
@click.option("--print0", is_flag=True,
              help="Print only the paths, best first, each ended by a NUL byte (for `xargs -0`): exact for "
              "any file name.")
@click.option(
    "--min-duration", default=None, type=click.FloatRange(min=0), help="Only files at least S s long."
)
@click.option(
    "--max-duration", default=None, type=click.FloatRange(min=0), help="Only files at most S s long."
)
@click.option("--glob", "glob", default=None, help="Only files whose name or path matches (e.g. '*.wav').")
@click.option(
    "--scorer",
    default=None,
    type=click.Choice(["adapter", "bridge", "hybrid"]),
    help="adapter: the trained model; bridge: zero-shot AudioSet tags (no model needed); hybrid: both. "
    "Default: the best this library can use (hybrid, else adapter, else bridge).",
)
@click.option(
    "--like",
    default=None,
    metavar="PATH[@SECONDS]",
    help="More like this: rank by similarity to a file the library holds (at SECONDS: the part of a long "
    "file around that time). Its own file is left out. No model needed.",
)
@click.option("--explain", is_flag=True,
              help="Show each result's top AudioSet tags, marking those that match the query (towers with "
                   "an AudioSet head; also adds 'tags' to --json).")
@click.option(
    "--csv",
    "csv_path",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="Dataset mode: Clotho-format captions CSV.",
)
@click.option(
    "--audio-dir",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Dataset mode: the audio folder.",
)
@click.option(
    "--feats",
    default=None,
    type=click.Path(file_okay=False),
    help="Dataset mode: feature cache (default RUN/features).",
)
def search(
    args,
    db,
    audio,
    k,
    as_json,
    paths_only,
    print0,
    min_duration,
    max_duration,
    glob,
    scorer,
    like,
    explain,
    csv_path,
    audio_dir,
    feats,
):
    """Search a library (--db LIB "text" | --db LIB --audio clip.wav) or a dataset
    (RUN "text" --csv C --audio-dir D). Query by example uses the first 30 s of the sound."""
    if sum([as_json, paths_only, print0]) > 1:
        raise QueryError("choose one of --json, --paths-only and --print0")
    mode = "json" if as_json else "paths" if paths_only else "print0" if print0 else "table"
    if like is not None:
        if db is None or args or audio is not None or scorer is not None:
            raise QueryError("--like searches a library by one of its own files, alone",
                             fix="atae search --db LIB --like PATH[@SECONDS] (no text, --audio or --scorer)")
        rows = like_search(db, like, k=k, min_duration=min_duration, max_duration=max_duration, glob=glob)
        _print(rows, mode)
        return
    if db is not None:
        if len(args) > 1:
            raise QueryError(
                f"expected one quoted query, got {len(args)} words",
                fix='quote the query: atae search --db LIB "a door creaks open"',
            )
        text = args[0] if args else None
        if text is None and audio is None:
            raise QueryError("nothing to search for", fix="give a text query or --audio example.wav")
        if text is not None and audio is not None:
            raise QueryError("give a text query or --audio, not both")
        from atae.library import Library

        with Library.open(db) as lib:
            if text is not None and scorer is None:
                from atae.library.scorers import default_scorer

                scorer = default_scorer(lib)
            results = lib.search(
                text,
                audio=audio,
                k=k,
                min_duration=min_duration,
                max_duration=max_duration,
                glob=glob,
                scorer=scorer,
                explain=explain,
            )
            untagged = lib.scorers()["untagged"] if scorer in ("bridge", "hybrid") else 0
        if untagged:
            echo(f"note: {untagged} segments have no AudioSet tags and are left out of {scorer} results "
                 "(indexed by an older atae?); index the folder into a new --db to include them",
                 fg="yellow", err=True)
        _print([r.to_dict() for r in results], mode)
        return
    if len(args) != 2 or not csv_path or not audio_dir:
        raise QueryError(
            'use `atae search --db LIB "query"` (a library) or '
            '`atae search RUN "query" --csv C --audio-dir D` (a dataset)'
        )
    rows = dataset_search(args[0], args[1], csv_path, audio_dir, k=k, feats=feats, scorer=scorer or "adapter")
    _print(rows, mode)


def dataset_search(
    run: str,
    text: str,
    csv_path: str,
    audio_dir: str,
    *,
    k: int = 10,
    feats: str | None = None,
    progress: bool = True,
    scorer: str = "adapter",
) -> list[dict]:
    """Rank the clips of a Clotho-format dataset for ``text`` with the trained model ``run`` and one
    scorer (``atae.evaluate.scores_for``: adapter, bridge or hybrid; the tuned values in RUN's extras)."""
    import numpy as np

    from atae.bridge import require_tag_head
    from atae.data import read_caption_csv
    from atae.evaluate import scores_for, towers_for_model
    from atae.features import FeatureStore, extract_audio
    from atae.model import AlignedModel
    from atae.query import clean_query

    text = clean_query(text)
    model = AlignedModel.load(run)
    audio_tower, text_tower = towers_for_model(model)
    if scorer in ("bridge", "hybrid"):
        require_tag_head(audio_tower)
    dataset = read_caption_csv(csv_path, audio_dir)
    for p in dataset.problems:
        echo(f"warning: {p}", fg="yellow", err=True)
    table = FeatureStore(feats or Path(run) / "features").audio_table(audio_tower.info)
    rep = extract_audio(
        table, audio_tower, [(c.key, c.path) for c in dataset.clips if c.path is not None], progress=progress
    )
    for path, why in rep.failed:
        echo(f"warning: skipped {path}: {why}", fg="yellow", err=True)
    clips = [c for c in dataset.clips if c.key in table]
    if not clips:
        return []
    scores = scores_for(scorer, candidates=[c.key for c in clips], texts=[text], audio_table=table,
                        model=model, text_tower=text_tower, audio_tower=audio_tower)[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        {
            "rank": r + 1,
            "score": round(float(scores[i]), 6),
            "path": str(clips[i].path),
            "file_name": clips[i].key,
        }
        for r, i in enumerate(order)
    ]


def like_search(db: str, like: str, *, k: int = 10, **filters) -> list[dict]:
    """``--like PATH[@SECONDS]``: the results of ``Library.similar`` for an indexed file (or the part of
    it around SECONDS), as dicts; the first line printed says what was searched like."""
    from atae.library import Library
    from atae.library.similar import describe

    with Library.open(db) as lib:
        path, seconds = _split_like(lib, like)
        ids = lib.segments_at(path, seconds)
        results = lib.similar(ids, k=k, **filters)
        src = describe(lib, ids[0])
    where = "" if seconds is None else f" @ {_ts(src['start_s'])}-{_ts(src['end_s'])}"
    echo(f"more like {src['path']}{where}:", err=True)
    return [r.to_dict() for r in results]


def _split_like(lib, like: str) -> tuple[str, float | None]:
    """PATH or PATH@SECONDS (a path that itself holds an @ is taken whole when the library has it)."""
    if "@" not in like or lib.db.file_by_path(os.path.abspath(os.path.expanduser(like))) is not None:
        return like, None
    path, _, t = like.rpartition("@")
    try:
        seconds = float(t)
        if not math.isfinite(seconds):
            raise ValueError(t)
    except ValueError:
        raise QueryError(f"{t!r} after the @ is not a time in seconds", path=path,
                         fix="write --like PATH@SECONDS, e.g. --like walk.wav@12.5") from None
    return path, seconds


def _print(rows: list[dict], mode: str) -> None:
    if mode == "json":
        echo_json(rows)
        return
    if mode == "print0":
        sys.stdout.flush()
        for r in rows:
            sys.stdout.buffer.write(os.fsencode(r["path"]) + b"\0")
        sys.stdout.buffer.flush()
        return
    if mode == "paths":
        bad = [r for r in rows if not is_clean(r["path"])]
        if bad:
            raise QueryError(
                f"result {bad[0]['rank']} has a control character (e.g. a newline) in its name "
                f"({escape(bad[0]['path'])}), which one path a line cannot carry",
                fix="use --print0 (NUL-separated, for `xargs -0`) or --json",
            )
        for r in rows:
            echo(r["path"])
        return
    if not rows:
        echo("no results")
        return
    for r in rows:
        line = f"{r['rank']:>3}  {r['score']:.3f}  {r['path']}"
        if r.get("duration") is not None:
            span = ""
            if r["end_s"] - r["start_s"] < r["duration"] - 1e-6:
                span = f"  @ {_ts(r['start_s'])}-{_ts(r['end_s'])}"
            line += f"  ({_ts(r['duration'])}){span}"
        echo(line)
        _print_tags(r)


def _print_tags(r: dict) -> None:
    """The explanation line under a result: tags that match the query first, then the others."""
    tags = r.get("tags")
    if r.get("missing"):
        echo("       (no longer on disk: run `atae index` again)")
    if not tags:
        return
    matched = [f"{t['label']} {t['prob']:.2f}" for t in tags if t["matched"]]
    other = [f"{t['label']} {t['prob']:.2f}" for t in tags if not t["matched"]]
    parts = ([f"matches: {', '.join(matched)}"] if matched else []) + ([f"tags: {', '.join(other)}"]
                                                                        if other else [])
    echo("       " + "  |  ".join(parts))


def _ts(s: float) -> str:
    m, sec = divmod(float(s), 60)
    return f"{int(m)}:{sec:04.1f}"


COMMANDS = [search]
