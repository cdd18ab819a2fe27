"""Everything the `atae` command prints goes through here.

File names, captions and error reasons are untrusted: ``echo`` shows every non-printable character
(newlines, terminal control sequences, bidi overrides, bytes that are not UTF-8) as a visible escape
(``atae.printable.escape``), so one message is one line and nothing reaches the terminal as a command;
``echo_json`` does the same inside JSON strings. ``error_line`` turns any failure a user can cause (an
``AtaeError``, a full disk, a file the OS refuses) into the one line ``_Group`` prints instead of a
traceback.
"""

from __future__ import annotations

import contextlib
import sqlite3
import warnings

import click

from atae.errors import AtaeError, DiskFullError
from atae.io import disk_full
from atae.printable import dumps_json, escape

__all__ = ["echo", "echo_lines", "echo_json", "error_line", "print_warnings_safely"]


def echo(message: object = "", *, err: bool = False, nl: bool = True, fg: str | None = None,
         bold: bool | None = None) -> None:
    """Print one line (colour only on a terminal, as click does); control characters are escaped."""
    text = escape(message)
    if fg or bold:
        click.secho(text, err=err, nl=nl, fg=fg, bold=bold)
    else:
        click.echo(text, err=err, nl=nl)


def echo_lines(text: object, **kwargs) -> None:
    """Print text made of several lines (a report, a table): each line escaped on its own. Producers
    escape the untrusted parts of a line themselves, so a newline in a file name cannot add a line."""
    for line in str(text).split("\n"):
        echo(line, **kwargs)


def echo_json(obj, **kwargs) -> None:
    click.echo(dumps_json(obj, indent=2, **kwargs))


@contextlib.contextmanager
def print_warnings_safely():
    """Route Python warnings (which may quote a file name) through ``echo``: one escaped line each."""
    def show(message, category, filename, lineno, file=None, line=None):
        echo(f"warning: {message}", err=True, fg="yellow")

    old, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = old


def error_line(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can fix, or None for a bug (shown as a traceback)."""
    if isinstance(exc, AtaeError):
        return str(exc)
    where = getattr(exc, "filename", None) or None
    if disk_full(exc, where or ".") is not None:
        return str(DiskFullError(where))
    if isinstance(exc, sqlite3.Error):
        return f"library database error ({exc}) (fix: run the same command again; if it persists, " \
               "index into a new --db)"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or exc} (fix: check the path and its permissions)"
    return None
