"""Options shared by several commands."""

from __future__ import annotations

import click

from atae.device import CHOICES

device_option = click.option(
    "--device", default="auto", show_default=True,
    help=f"Where the towers and adapters run: {CHOICES} (auto: a CUDA GPU when present, else the CPU).")


def ray_options(f):
    """``--ray-address`` and ``--workers`` (commands with ``--engine ray``)."""
    f = click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
                     help="Tower actors with --engine ray.")(f)
    return click.option("--ray-address", default=None, help="A running Ray cluster (e.g. ray://host:10001 or "
                        "auto); default: a local one on this machine's CPUs.")(f)
