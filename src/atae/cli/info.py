"""`atae info` (alias `atae doctor`): which towers, models and libraries are here, and what each enables."""

from __future__ import annotations

import click

from atae import inventory
from atae.cli.output import echo, echo_json

SCORER_WORDS = {"adapter": "trained model", "bridge": "zero-shot tags", "hybrid": "model + tags"}


@click.command("info")
@click.option("--model", "models", multiple=True, type=click.Path(file_okay=False),
              help="Also check a trained model folder (repeatable): are its tower weights here?")
@click.option("--db", "dbs", multiple=True, type=click.Path(file_okay=False),
              help="Also describe a library (repeatable): its tower, model and usable scorers.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def info(models, dbs, as_json):
    """Installed towers (where, and what each enables), and the models and libraries you name."""
    from atae.weights import atae_home

    report = {"atae_home": str(atae_home()), "towers": inventory.towers(),
              "models": [inventory.model(m) for m in models],
              "libraries": [inventory.library(d) for d in dbs]}
    if as_json:
        echo_json(report)
        return
    echo(f"weights folder ($ATAE_HOME/weights): {report['atae_home']}/weights")
    for kind in ("audio", "text"):
        echo(f"\n{kind} towers:")
        for t in (t for t in report["towers"] if t["kind"] == kind):
            size = f" ({t['size'] / 1e6:.0f} MB)" if t["size"] and t["size"] < 1e9 else ""
            mark = "  <- atae index uses this" if t["default"] else ""
            echo(f"  {t['name']:20s} {'installed' if t['installed'] else 'not installed'}{mark}")
            echo(f"  {'':20s} {t['enables']}")
            where = t["path"] if t["installed"] else f"get it: {t['how']}{size}"
            echo(f"  {'':20s} {where}")
    for m in report["models"]:
        echo(f"\nmodel {m['path']}: enables {', '.join(m['enables'])}")
        for kind, t in m["towers"].items():
            state = f"weights here: {t['path']}" if t["found"] else t["problem"]
            echo(f"  {kind} tower {t['name']}: {state}")
    for lib in report["libraries"]:
        echo(f"\nlibrary {lib['path']}: {lib['files']} files, {lib['hours']:.2f} h, audio tower "
             f"{lib['audio_tower']}, model {lib['model'] or 'none'}")
        for name in lib["scorers"]:
            echo(f"  {SCORER_WORDS[name]} ({name}){'  <- default' if name == lib['default'] else ''}")
        for name, why in lib["unavailable"].items():
            echo(f"  {SCORER_WORDS[name]} ({name}): not available, {why}")


doctor = click.Command("doctor", callback=info.callback, params=info.params, help=info.help, hidden=True)

COMMANDS = [info, doctor]
