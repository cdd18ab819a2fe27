"""Options shared by several commands."""

from __future__ import annotations

import click

from atae.device import CHOICES

device_option = click.option(
    "--device", default="auto", show_default=True,
    help=f"Where the towers and adapters run: {CHOICES} (auto: a CUDA GPU when present, else the CPU).")
