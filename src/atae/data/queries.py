"""DCASE 2025 multi-positive query files: ``query,audio_filenames``.

``audio_filenames`` is a Python list literal (``"['a.wav', 'b.wav']"``), parsed with ``ast.literal_eval``
(never ``eval``) and validated to be a non-empty list of strings. File names are kept exactly as written,
HTML entities included (``d&#39;eau.wav``): the Clotho caption CSVs write the same names the same way, so
keys match; resolving them to files on disk is the job of ``data.clotho.resolve_audio``.
A malformed row raises ``DataError`` naming the file and line: silently dropping a query would change the
metric.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from atae.data.clotho import csv_rows, header_columns, read_text
from atae.errors import DataError


@dataclass
class Query:
    text: str
    relevant: list[str]  # file names as written in the query file, duplicates removed, order kept


def read_queries_csv(path) -> list[Query]:
    """Queries in file order; each with the file names of its relevant clips."""
    path = Path(path)
    rows = csv_rows(read_text(path, fallback_problem=[]))
    if not rows:
        raise DataError("the query file is empty", path=path, fix="expected a header query,audio_filenames")
    cols, _ = header_columns(path, rows[0], ["query", "audio_filenames"], None, "query,audio_filenames")
    qi, fi = cols["query"], cols["audio_filenames"]
    out = []
    for line, row in enumerate(rows[1:], start=2):
        text = row[qi] if qi < len(row) else ""
        raw = row[fi] if fi < len(row) else ""
        if not text.strip():
            raise DataError(f"line {line}: empty query", path=path, fix="remove the row or write its text")
        try:
            files = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"line {line}: audio_filenames {raw[:80]!r} is not a list literal", path=path,
                            fix="write it like \"['a.wav', 'b.wav']\"") from None
        ok = isinstance(files, list | tuple) and files and all(isinstance(f, str) and f for f in files)
        if not ok:
            raise DataError(f"line {line}: audio_filenames must be a non-empty list of names: {raw[:80]!r}",
                            path=path, fix="write it like \"['a.wav', 'b.wav']\"")
        out.append(Query(text, list(dict.fromkeys(files))))
    return out
