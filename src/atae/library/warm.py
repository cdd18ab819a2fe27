"""Load, before the first search, everything a search would load on first use (``atae serve``).

A first search otherwise pays for reading the model, building the text tower, embedding the 527 label
prompts, building the search state and starting the audio tower, seconds that a user takes for a slow
engine. ``warm_up`` runs one throwaway query through the library's default scorer, the tag explanation
and the audio tower, so the first real search costs what every later one does. A part that cannot load
(a missing model folder, absent tower weights) is reported, not raised: the rest still serves.
"""

from __future__ import annotations

import numpy as np

from atae.errors import AtaeError

WARM_QUERY = "rain falling on a roof"


def warm_up(library) -> list[str]:
    """Load the scorers, explanations and the audio tower of ``library``; returns one line per part
    that could not load (empty: everything is ready)."""
    problems: list[str] = []
    name = library.scorers()["default"]
    if name is not None:
        try:
            res = library.search(WARM_QUERY, k=1, scorer=name)
            library.explain(res, text=WARM_QUERY)
        except AtaeError as e:
            problems.append(f"text search is not ready: {e}")
    try:
        tower = library.audio_tower
        tower.encode(np.zeros(tower.sample_rate, np.float32))
    except AtaeError as e:
        problems.append(f"search by an example sound is not ready: {e}")
    return problems
