"""`python tests/cli_child.py ARGS...` runs the `atae` command in a process of its own with the small
fake towers of ``library_fakes`` registered as ``bands`` (audio) and ``words`` (text): for tests that need
a real process (kill -9 at random points, dropped privileges, a private mount with a full disk).
``ATAE_TEST_DELAY`` (seconds per encoded clip) slows the audio tower so a kill lands inside the work;
``ATAE_TEST_SRC`` names the ``src`` folder to import atae from (``child_env()`` sets it to the parent's).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:0] = [os.environ.get("ATAE_TEST_SRC", str(HERE.parent / "src")), str(HERE)]

from atae.towers import registry  # noqa: E402
from library_fakes import BandTower, WordTower  # noqa: E402


class Bands(BandTower):
    def __init__(self, weights=None, **kwargs):
        super().__init__(delay=float(os.environ.get("ATAE_TEST_DELAY", "0")))


class Words(WordTower):
    def __init__(self, model=None, weights=None, **kwargs):
        pass


def register() -> None:
    registry.AUDIO_TOWERS.setdefault("bands", "cli_child:Bands")
    registry.TEXT_TOWERS.setdefault("words", "cli_child:Words")


register()


def child_env(**extra) -> dict:
    """Environment for ``python cli_child.py``: the atae this process imported, plus ``extra``."""
    import atae

    return {**os.environ, "ATAE_TEST_SRC": str(Path(atae.__file__).resolve().parents[1]),
            **{k: str(v) for k, v in extra.items()}}

if __name__ == "__main__":
    from atae.cli import main

    print("ready", flush=True)
    main(sys.argv[1:], prog_name="atae")
