"""The one cleaning step every text query goes through (API, CLI, web page, evaluation, the bridge).

Policy (documented for users): Unicode is NFKC-normalised; tabs, newlines and other whitespace become
single spaces; any other control character (C0, DEL, C1: e.g. a NUL pasted from a binary file or an ANSI
escape) is *rejected*, not silently stripped, so a mangled query is noticed instead of answered. Empty
queries, queries with no letter or digit ("?!", "—") and queries over ``MAX_QUERY_BYTES`` (10 kB of
UTF-8; a caption is ~100 bytes) are rejected with a ``QueryError`` that says how to fix them.
"""

from __future__ import annotations

import re
import unicodedata

from atae.errors import QueryError

MAX_QUERY_BYTES = 10_000
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def clean_query(text) -> str:
    """The normalised query, or ``QueryError`` saying what is wrong and how to fix it."""
    if not isinstance(text, str):
        raise QueryError(f"the query must be text, not {type(text).__name__}")
    n = len(text.encode("utf-8", errors="surrogatepass"))
    if n > MAX_QUERY_BYTES:
        raise QueryError(f"the query is {n} bytes long; the limit is {MAX_QUERY_BYTES}",
                         fix="describe the sound in a sentence or two")
    for i, ch in enumerate(text):
        if ch not in "\t\n\r\f\v" and unicodedata.category(ch) in ("Cc", "Cs"):
            raise QueryError(f"the query contains a control character (U+{ord(ch):04X}) at position {i}",
                             fix="remove control characters from the query")
    cleaned = " ".join(unicodedata.normalize("NFKC", text).split())
    if not cleaned:
        raise QueryError("the query is empty", fix='type a description of the sound, e.g. "a door creaks"')
    if not _NON_WORD.sub(" ", cleaned).strip():
        raise QueryError(f"the query {cleaned!r} has no words",
                         fix="type a few words that describe the sound")
    return cleaned
