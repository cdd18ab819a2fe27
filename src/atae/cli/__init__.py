"""The `atae` command: thin click wrappers over library functions, one module per command group."""

from __future__ import annotations

import importlib
import sys

import click

from atae.cli.output import echo, error_line, print_warnings_safely

# module -> the click commands it defines (imported lazily so `atae --help` stays fast)
_COMMAND_MODULES = [
    "atae.cli.extract",
    "atae.cli.train",
    "atae.cli.score",
    "atae.cli.tune",
    "atae.cli.search",
    "atae.cli.library",
    "atae.cli.weights",
    "atae.cli.demo",
    "atae.cli.info",
]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            with print_warnings_safely():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            echo("interrupted: work done so far is kept; run the same command again to resume",
                 fg="yellow", err=True)
            sys.exit(130)
        except Exception as e:
            line = error_line(e)
            if line is None:
                raise
            echo(f"error: {line}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="atae")
def main() -> None:
    """atae: search sounds with words. Aligned Text and Audio Embeddings (DCASE 2022 seed system)."""


for _name in _COMMAND_MODULES:
    _mod = importlib.import_module(_name)
    for _cmd in getattr(_mod, "COMMANDS", []):
        main.add_command(_cmd)
