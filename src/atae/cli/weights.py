"""`atae weights list | path NAME | fetch NAME | verify [NAME]`: thin wrappers over atae.weights."""

from __future__ import annotations

import sys

import click

from atae import weights as W
from atae.cli.output import echo


@click.group()
def weights() -> None:
    """Pretrained tower weights: where they are, where they come from, and their checksums."""


@weights.command("list")
def list_() -> None:
    """Every registered weights name with its source, licence, size, SHA-256 and whether it is here."""
    for name, spec in W.WEIGHTS.items():
        try:
            where = str(W.resolve(name))
        except W.WeightsError:
            where = "not installed"
        size = f"{spec.size / 1e6:.0f} MB" if spec.size else "size ?"
        echo(f"{name:20s} {size:>8s}  {spec.license}")
        echo(f"{'':20s} {spec.description}")
        echo(f"{'':20s} source: {spec.url}")
        echo(f"{'':20s} sha256: {_sha256_line(spec)}")
        echo(f"{'':20s} here:   {where}")


def _sha256_line(spec) -> str:
    """The registry's SHA-256 of a single-file spec; what verify checks otherwise."""
    if spec.sha256:
        return spec.sha256
    if spec.kind == "dir":
        return "a folder: `atae weights verify` checks its files are complete"
    return "not published upstream: `atae weights verify` shows the installed file's"


@weights.command("path")
@click.argument("name")
def path(name: str) -> None:
    """Print the resolved path of NAME (error with the fetch command when absent)."""
    echo(str(W.resolve(name)))


@weights.command("fetch")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="folder to download into (default: $ATAE_HOME/weights/NAME)")
def fetch(name: str, dest: str | None) -> None:
    """Download NAME (resumable, checksum-verified). The only command that uses the network."""
    echo(str(W.fetch(name, dest)))


@weights.command("verify")
@click.argument("name", required=False)
def verify(name: str | None) -> None:
    """Check installed weights against the registry's checksums (exit 1 on a mismatch)."""
    bad = False
    for r in W.verify(name):
        detail = r.detail if r.status != "missing" else "not installed"
        echo(f"{r.name:20s} {r.status:10s} {r.path or ''}  {detail}")
        bad |= r.status == "mismatch" or (name is not None and r.status == "missing")
    if bad:
        sys.exit(1)


COMMANDS = [weights]
