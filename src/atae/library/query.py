"""Validation of text queries, shared by the API, the CLI and the web server.

Policy (documented for users): tabs, newlines and other whitespace become single spaces; any other
control character (C0, DEL, C1: e.g. a NUL pasted from a binary file or an ANSI escape) is *rejected*,
not silently stripped, so a mangled query is noticed instead of answered. Empty or whitespace-only
queries and queries over ``MAX_QUERY_BYTES`` (10 kB of UTF-8; a caption is ~100 bytes) are rejected.
"""

from __future__ import annotations

import re
import unicodedata

from atae.errors import QueryError

MAX_QUERY_BYTES = 10_000
_WS = re.compile(r"\s+")


def validate_text_query(text) -> str:
    """Return the normalised query or raise ``QueryError`` saying what is wrong and how to fix it."""
    if not isinstance(text, str):
        raise QueryError(f"the query must be text, not {type(text).__name__}")
    n = len(text.encode("utf-8", errors="surrogatepass"))
    if n > MAX_QUERY_BYTES:
        raise QueryError(
            f"the query is {n} bytes long; the limit is {MAX_QUERY_BYTES}",
            fix="describe the sound in a sentence or two",
        )
    for i, ch in enumerate(text):
        if ch in "\t\n\r\f\v":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cc" or cat == "Cs":
            raise QueryError(
                f"the query contains a control character (U+{ord(ch):04X}) at position {i}",
                fix="remove control characters from the query",
            )
    text = _WS.sub(" ", text).strip()
    if not text:
        raise QueryError("the query is empty", fix='type a description of the sound, e.g. "a door creaks"')
    return text
