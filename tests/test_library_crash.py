"""kill -9 during indexing: the library opens, searches what was committed, and the next run finishes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atae.library import Library
from library_fakes import FREQS, BandTower, IdentityModel, WordTower, write_tone

N_FILES = 30
REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{src!r}, {tests!r}]
    from library_fakes import BandTower, IdentityModel, WordTower
    from atae.library import Library
    lib = Library.open({lib!r}, create=True, audio_tower=BandTower(delay=0.05), text_tower=WordTower(),
                       model=IdentityModel())
    print("started", flush=True)
    lib.add([{src_dir!r}], batch_files=3)
    print("finished", flush=True)
""")


def _committed(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("kill_after", [2, 9])
def test_kill_9_then_resume(tmp_path, kill_after):
    src_dir = tmp_path / "sounds"
    names = list(FREQS)
    for i in range(N_FILES):
        write_tone(src_dir / f"{i:02d}_{names[i % 3]}.wav", FREQS[names[i % 3]], seconds=0.5, seed=i)
    lib_dir = tmp_path / "lib"
    code = _CHILD.format(
        src=str(REPO / "src"), tests=str(REPO / "tests"), lib=str(lib_dir), src_dir=str(src_dir)
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _committed(lib_dir / "library.sqlite") < kill_after * 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _committed(lib_dir / "library.sqlite")
    assert kill_after * 3 <= done < N_FILES

    lib = Library.open(lib_dir, audio_tower=BandTower(), text_tower=WordTower(), model=IdentityModel())
    assert lib.stats()["files"] == done and lib.index.ntotal == done
    res = lib.search("high", k=N_FILES)
    assert len(res) == done and res[0].path.endswith("_high.wav")

    rep = lib.add([src_dir])
    assert rep.new == N_FILES - done and rep.unchanged == done and rep.failed == []
    assert lib.stats()["files"] == N_FILES
    assert len(lib.search("mid", k=100)) == N_FILES
    lib.close()
    # and it reopens cleanly, with an index file consistent with SQLite
    lib = Library.open(lib_dir, audio_tower=BandTower(), text_tower=WordTower(), model=IdentityModel())
    assert lib.index.ntotal == N_FILES
