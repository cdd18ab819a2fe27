"""kill -9 at random points of `atae index` and `atae train`, then a read and a resume.

Each point is seeded: a real `atae` process (``cli_child.py``: the fake towers, forked from a warm
process so the whole run takes a second or two) is killed with SIGKILL after a random delay drawn over
the time an uninterrupted run takes. Then:
* index: a read command (`search`) either answers or says the library is unfinished, and changes
  nothing; the same `index` command is accepted and finishes; every file on disk is in the library
  exactly once (no duplicates, no rows of old paths), with the right number of segments, and the vector
  index holds exactly those segments;
* train: the same `train` command is accepted and finishes, the model loads and equals the model of
  an uninterrupted run (training resumes exactly).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli_child
from atae.cli import main
from atae.library import Library
from atae.library.indexer import HOP_S, LONG_S, WINDOW_S, segment_plan
from library_fakes import FREQS, BandTower, WordTower, write_tone

POINTS = 10
SEED = 20240611
DELAY = 0.03  # seconds per clip the fake tower takes in the killed process: spreads the work out
LOAD = 0.3  # seconds the fake tower takes to load, like real weights: a window inside library creation
HORIZON = 0.9  # kill points are drawn over this fraction of an uninterrupted run (some land after its end)


@pytest.fixture(autouse=True, scope="module")
def fake_towers():
    """The fake towers `bands` and `words`, registered for this module only (its fixtures use them)."""
    with cli_child.towers_registered():
        yield


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def zygote():
    """One warm process forks every command (one torch thread, like the in-process resumes)."""
    z = cli_child.Zygote(ATAE_TEST_TORCH_THREADS=1)
    yield z
    z.close()


def _run_to_end(zygote, args, log) -> float:
    """Seconds an uninterrupted command takes."""
    t0 = time.monotonic()
    zygote.start(args, log, ATAE_TEST_DELAY=DELAY, ATAE_TEST_LOAD=LOAD)
    code = zygote.reap()
    assert code == 0, Path(log).read_text()
    return time.monotonic() - t0


def _kill_after(zygote, args, delay: float, log) -> None:
    pid = zygote.start(args, log, ATAE_TEST_DELAY=DELAY, ATAE_TEST_LOAD=LOAD)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still this command's, finished or not
    code = zygote.reap()
    assert code in (0, -signal.SIGKILL), Path(log).read_text()
    print(f"kill after {delay:.2f} s: {'killed' if code else 'had finished'}")  # shown with -s


def _points(kind: str, horizon: float) -> list[float]:
    rng = random.Random(f"{SEED}-{kind}")
    return [rng.uniform(0.0, horizon) for _ in range(POINTS)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from atae.model import AlignedModel

    m = AlignedModel(BandTower().info, WordTower().info, hidden=16, out_dim=16)
    with torch.no_grad():
        for ad in (m.audio_adapter, m.text_adapter):
            for lin in (ad.fc1, ad.fc2):
                lin.weight.copy_(torch.eye(16))
                lin.bias.zero_()
    d = tmp_path_factory.mktemp("model") / "run"
    m.save(d)
    return d


# --- index ------------------------------------------------------------------------------------------------

def _version_a(d: Path) -> None:
    names = list(FREQS)
    for i in range(18):
        n = names[i % 3]
        write_tone(d / "packs" / "old" / f"{i:02d}_{n}.wav", FREQS[n], seconds=1.0, seed=i)
    write_tone(d / "edit_me.wav", FREQS["low"], seconds=1.0, seed=50)
    write_tone(d / "delete_me.wav", FREQS["mid"], seconds=1.0, seed=51)


def _version_b(d: Path) -> None:
    """Rename a folder (moves), edit a file, delete one, add new ones and a long recording."""
    (d / "packs" / "old").rename(d / "packs" / "new")
    write_tone(d / "edit_me.wav", FREQS["high"], seconds=1.5, seed=52, event=(0.2, 0.6, 1300.0))  # unique
    (d / "delete_me.wav").unlink()
    names = list(FREQS)
    for i in range(12):
        write_tone(d / "fresh" / f"{i:02d}.wav", FREQS[names[i % 3]], seconds=0.7, seed=100 + i)
    write_tone(d / "fresh" / "long.wav", None, seconds=70.0, event=(40.0, 3.0, FREQS["high"]))


def _library_rows(lib_dir: Path) -> tuple[list[str], dict[str, int], list[int]]:
    con = sqlite3.connect(f"file:{lib_dir / 'library.sqlite'}?mode=ro", uri=True)
    try:
        paths = [r[0] for r in con.execute("SELECT path FROM files")]
        segs = dict(con.execute("SELECT f.path, count(s.id) FROM files f LEFT JOIN segments s "
                                "ON s.file_id = f.id GROUP BY f.id"))
        seg_ids = [r[0] for r in con.execute("SELECT id FROM segments ORDER BY id")]
        failed = con.execute("SELECT count(*) FROM files WHERE status != 'ok'").fetchone()[0]
    finally:
        con.close()
    assert failed == 0
    return paths, segs, seg_ids


def _dump(lib_dir: Path):
    if not (lib_dir / "library.sqlite").exists():
        return None
    con = sqlite3.connect(f"file:{lib_dir / 'library.sqlite'}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in sorted(tables)}
    finally:
        con.close()


@pytest.fixture(scope="module")
def index_horizon(tmp_path_factory, run_dir, zygote):
    """Seconds an uninterrupted index takes: creating the library, and updating it."""
    out = {}
    for kind in ("create", "update"):
        d = tmp_path_factory.mktemp(f"index-ref-{kind}")
        _version_a(d / "sounds")
        if kind == "update":
            assert _cli("index", d / "sounds", "--db", d / "lib", "--model", run_dir)[0] == 0
        _version_b(d / "sounds")
        args = ["index", d / "sounds", "--db", d / "lib", "--model", run_dir, "--no-progress"]
        out[kind] = _run_to_end(zygote, args, d / "log")
    return out


@pytest.mark.parametrize("point", range(POINTS))
def test_kill_9_during_index_then_read_and_resume(tmp_path, run_dir, index_horizon, zygote, point):
    update = bool(point % 2)  # half the points interrupt an update of an existing library, half its creation
    delay = _points("index", HORIZON)[point] * index_horizon["update" if update else "create"]
    sounds, lib = tmp_path / "sounds", tmp_path / "lib"
    _version_a(sounds)
    if update:
        assert _cli("index", sounds, "--db", lib, "--model", run_dir)[0] == 0
    _version_b(sounds)
    index = ["index", sounds, "--db", lib, "--model", run_dir, "--no-progress"]
    _kill_after(zygote, index, delay, tmp_path / "log")

    before = _dump(lib)
    code, out = _cli("search", "--db", lib, "--audio", sounds / "edit_me.wav", "--paths-only", "-k", "50")
    assert code == 0 or (code == 2 and ("unfinished" in out or "no library here" in out)), out
    assert _dump(lib) == before  # the read changed nothing

    code, out = _cli(*index)
    assert code == 0 and "failed 0" in out, out
    on_disk = sorted(str(p) for p in sounds.rglob("*.wav"))
    paths, segs, seg_ids = _library_rows(lib)
    assert sorted(paths) == on_disk  # every file exactly once, no rows of renamed or deleted paths
    import soundfile as sf

    for p in on_disk:
        plan = segment_plan(sf.info(p).duration, long_s=LONG_S, window_s=WINDOW_S, hop_s=HOP_S)
        assert segs[p] == len(plan), p
    with Library.open(lib) as opened:
        assert np.array_equal(opened.index.ids(), np.array(seg_ids, dtype=np.int64))
        top = opened.search(audio=str(sounds / "edit_me.wav"), k=1)[0]
        assert top.path == str(sounds / "edit_me.wav") and top.score == pytest.approx(1.0, abs=1e-5)


# --- train ------------------------------------------------------------------------------------------------

def _dataset(d: Path) -> list:
    names = list(FREQS)
    rows = []
    for i in range(24):
        n = names[i % 3]
        write_tone(d / "audio" / f"{i:02d}_{n}.wav", FREQS[n], seconds=1.0, seed=i)
        rows.append(f"{i:02d}_{n}.wav,a {n} tone,the {n} sound,{n}")
    for split, part in (("train", rows[:16]), ("val", rows[16:])):
        (d / f"{split}.csv").write_text("file_name,caption_1,caption_2,caption_3\n" + "\n".join(part) + "\n")
    return ["--recipe", "atae", "--train-csv", d / "train.csv", "--train-audio", d / "audio", "--val-csv",
            d / "val.csv", "--val-audio", d / "audio", "--audio-encoder", "bands", "--text-encoder", "words",
            "--max-epochs", "6", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory, zygote):
    """(uninterrupted model, seconds it takes) from a process with one torch thread."""
    from atae.model import AlignedModel

    d = tmp_path_factory.mktemp("train-ref")
    args = _dataset(d)
    seconds = _run_to_end(zygote, ["train", *args, "--out", d / "run"], d / "log")
    return AlignedModel.load(d / "run"), seconds


@pytest.mark.parametrize("point", range(POINTS))
def test_kill_9_during_train_then_resume(tmp_path, train_reference, zygote, point):
    from atae.model import AlignedModel

    reference, horizon = train_reference
    delay = _points("train", HORIZON)[point] * horizon
    args = [*_dataset(tmp_path), "--out", tmp_path / "run"]
    _kill_after(zygote, ["train", *args], delay, tmp_path / "log")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the uninterrupted run: the same arithmetic, bit for bit
    try:
        code, out = _cli("train", *args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and f"model saved to {tmp_path / 'run'}" in out, out
    model = AlignedModel.load(tmp_path / "run")
    for (k, v), (_, w) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
