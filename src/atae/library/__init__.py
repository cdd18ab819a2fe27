"""Your own sound library: incremental, crash-safe index (SQLite + FAISS) and search by text or example.

Example (the same as ``atae index`` / ``atae search``)::

    from atae.library import Library

    lib = Library.open("my-sounds.lib", create=True, model="runs/atae")  # model: a trained `atae train` dir
    report = lib.add(["~/Samples", "~/Field recordings"], progress=True)  # only new/changed files are encoded
    print(report.summary())                                # new / changed / unchanged / removed / failed
    for r in lib.search("a door creaks open", k=5, max_duration=60):
        print(r.rank, f"{r.score:.3f}", r.path, f"{r.start_s:.1f}-{r.end_s:.1f} s")
    for r in lib.search(audio="query.wav", k=5):           # query by example (works without a model too)
        print(r.rank, r.path)
    lib.search("a dog barks", scorer="bridge")             # zero-shot, for towers with an AudioSet head
    lib.close()

Layout on disk, windowing and incremental rules: ``api.py``, ``indexer.py``, ``db.py``, ``vectors.py``.
"""

from atae.library.api import Library, model_dir_checksum
from atae.library.indexer import IndexReport
from atae.library.results import Filters, SearchResult

__all__ = [
    "Filters",
    "Library",
    "SearchResult",
    "IndexReport",
    "model_dir_checksum",
]
