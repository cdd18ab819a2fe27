"""Hostile files and library states met by `atae index` / `search` / `extract` / `serve`: absurd headers,
unreadable folders, half-created and foreign libraries, renamed folders, edits a partial hash misses."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import cli_child
from atae.cli import main
from atae.errors import AudioError, LibraryError
from atae.library import Library
from hostile_files import lying_wav, without_root_overrides
from library_fakes import FREQS, SR, BandTower, IdentityModel, WordTower, write_tone

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fake_towers():
    """The fake towers `bands` and `words`, registered for each test only."""
    with cli_child.towers_registered():
        yield


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output  # stdout and stderr, interleaved
    assert "Traceback" not in out and (r.exception is None or isinstance(r.exception, SystemExit)), out
    return r.exit_code, out


@pytest.fixture
def sounds(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    return d


@pytest.fixture
def run_dir(tmp_path):
    """A saved AlignedModel over the fake towers whose adapters are the identity on these inputs."""
    import torch

    from atae.model import AlignedModel

    m = AlignedModel(BandTower().info, WordTower().info, hidden=16, out_dim=16)
    with torch.no_grad():
        for ad in (m.audio_adapter, m.text_adapter):
            for lin in (ad.fc1, ad.fc2):
                lin.weight.copy_(torch.eye(16))
                lin.bias.zero_()
    d = tmp_path / "run"
    m.save(d)
    return d


def _dump(lib_dir: Path) -> list:
    """Everything the library holds, as rows (independent of SQLite's page layout)."""
    con = sqlite3.connect(f"file:{lib_dir / 'library.sqlite'}?mode=ro", uri=True)
    try:
        return [sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in ("meta", "files", "segments")]
    finally:
        con.close()


# --- absurd headers: refused before anything is planned or decoded, on every path -------------------------

def _extract_csv(tmp_path, audio_dir, name):
    csv = tmp_path / "caps.csv"
    csv.write_text(f"file_name,caption_1\n{name},a low hum\n", encoding="utf-8")
    return csv


@pytest.mark.parametrize("rate,seconds,why", [
    (1, 80_000, "sample rate of 1 Hz"),  # 160 KB that would last 22 hours
    (1000, 3 * 3600 + 1, "declares 10801 s of audio, longer than the limit of 10800 s"),
])
def test_absurd_header_is_refused_at_once_by_every_path(tmp_path, sounds, rate, seconds, why):
    bad = lying_wav(sounds / "liar.wav", rate=rate, seconds=seconds)
    lib = tmp_path / "lib"
    code, out = _cli("index", sounds, "--db", lib, "--audio-encoder", "bands", "--json")
    assert code == 0, out
    import json

    rep = json.loads(out)["report"]
    assert rep["new"] == 3 and [p for p, _ in rep["failed"]] == [str(bad)]
    assert why in rep["failed"][0][1]
    # query by example, extraction and the waveform thumbnail give the same reason
    code, out = _cli("search", "--db", lib, "--audio", bad)
    assert code == 2 and why in out
    code, out = _cli("extract", "--csv", _extract_csv(tmp_path, sounds, "liar.wav"), "--audio-dir", sounds,
                     "--out", tmp_path / "feats", "--audio-encoder", "bands", "--text-encoder", "words")
    assert code == 0 and "liar.wav" in out and why in out
    from atae.server.waveform import file_envelope

    with pytest.raises(AudioError, match=why):
        file_envelope(bad)


# --- folders that cannot be read ---------------------------------------------------------------------------

def _run_cli_process(args):
    """`atae ARGS` in a process of its own that, even when run as root, is refused unreadable folders."""
    pre = without_root_overrides if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, str(HERE / "cli_child.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, preexec_fn=pre, env=cli_child.child_env())


def test_unreadable_folder_is_reported_and_its_indexed_files_kept(tmp_path, sounds):
    """A real permission denial (as root, the child process gives up root's right to read anything)."""
    write_tone(sounds / "locked" / "inside.wav", FREQS["low"], seconds=1.0)
    lib = tmp_path / "lib"
    try:
        r = _run_cli_process(["index", sounds, "--db", lib, "--audio-encoder", "bands"])
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot start a process without root's read-anything capabilities here ({exc})")
    assert r.returncode == 0 and "new 4" in r.stdout, r.stdout + r.stderr
    os.chmod(sounds / "locked", 0)
    try:
        r = _run_cli_process(["index", sounds, "--db", lib, "--audio-encoder", "bands"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "removed 0" in r.stdout and "not looked at 1" in r.stdout
        assert f"{sounds / 'locked'}: cannot read this folder (Permission denied)" in r.stderr
        assert "Traceback" not in r.stderr
        r = _run_cli_process(["search", "--db", lib, "--audio", sounds / "low.wav", "--paths-only"])
        assert str(sounds / "locked" / "inside.wav") in r.stdout.splitlines()  # indexed before: kept
    finally:
        os.chmod(sounds / "locked", 0o755)


def test_unreadable_folder_is_reported_even_where_root_could_read_it(tmp_path, sounds, monkeypatch):
    """The same rule without privileges to drop: the folder listing fails as it does for a user."""
    from atae.library import scan as scan_mod

    write_tone(sounds / "locked" / "inside.wav", FREQS["low"], seconds=1.0)
    real = os.scandir
    locked = str(sounds / "locked")

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower())
    rep = lib.add([sounds])
    assert rep.new == 3 and rep.not_scanned == [
        (locked, "cannot read this folder (Permission denied): its files are not indexed; fix its "
                 "permissions (the files indexed from it before are kept)")]
    lib.close()


# --- half-created libraries: reading never sets one up --------------------------------------------------

def test_failed_model_then_read_then_index_again(tmp_path, sounds, run_dir):
    lib = tmp_path / "lib"
    bad = tmp_path / "bad_run"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    code, out = _cli("index", sounds, "--db", lib, "--model", bad)
    assert code == 2 and "error:" in out
    code, out = _cli("search", "--db", lib, "--audio", sounds / "low.wav")
    assert code == 2 and ("no library here" in out or "unfinished" in out)
    code, out = _cli("index", sounds, "--db", lib, "--model", run_dir)
    assert code == 0 and "new 3" in out, out
    code, out = _cli("search", "--db", lib, "high", "--paths-only", "-k", "1")
    assert code == 0 and out.strip() == str(sounds / "high.wav")


def test_library_killed_before_its_settings_refuses_reads_and_index_finishes_it(tmp_path, sounds, run_dir):
    from atae.library.db import LibraryDB

    lib = tmp_path / "lib"
    lib.mkdir()
    LibraryDB(lib, create=True).close()  # what an `index` killed in its first second leaves
    before = _dump(lib)
    for args in (("search", "--db", lib, "low"), ("search", "--db", lib, "--audio", sounds / "low.wav"),
                 ("prune", "--db", lib)):
        code, out = _cli(*args)
        assert code == 2 and "unfinished" in out and "run the same `atae index" in out
    with pytest.raises(LibraryError, match="unfinished"):
        Library.open(lib)
    assert _dump(lib) == before  # nothing was set up by the readers
    code, out = _cli("index", sounds, "--db", lib, "--model", run_dir)
    assert code == 0 and "new 3" in out, out
    with Library.open(lib) as opened:
        assert opened.stored_tower_info.name == "bands"  # the model's tower, not a default


def test_reading_changes_nothing(tmp_path, sounds, run_dir):
    lib = tmp_path / "lib"
    assert _cli("index", sounds, "--db", lib, "--model", run_dir)[0] == 0
    before, names = _dump(lib), sorted(p.name for p in lib.iterdir())
    _cli("search", "--db", lib, "high")
    _cli("search", "--db", lib, "--audio", sounds / "mid.wav", "--json")
    _cli("prune", "--db", lib, "--dry-run")
    from fastapi.testclient import TestClient

    from atae.server.app import create_app

    with Library.open(lib) as opened, TestClient(create_app(opened), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/search", params={"q": "low"}).status_code == 200
        assert c.get("/api/stats").status_code == 200
    assert _dump(lib) == before
    assert sorted(p.name for p in lib.iterdir() if p.name != "library.sqlite-shm") == \
        [n for n in names if n != "library.sqlite-shm"]


# --- a foreign SQLite file where the library would be -------------------------------------------------------

def test_index_refuses_a_foreign_sqlite_file_and_leaves_it_alone(tmp_path, sounds):
    lib = tmp_path / "lib"
    lib.mkdir()
    con = sqlite3.connect(lib / "library.sqlite")
    con.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    con.execute("INSERT INTO contacts VALUES ('Ada', '555')")
    con.commit()
    con.close()
    data = (lib / "library.sqlite").read_bytes()
    code, out = _cli("index", sounds, "--db", lib, "--audio-encoder", "bands")
    assert code == 2 and "not an atae library" in out and "contacts" in out
    code, out = _cli("search", "--db", lib, "low")
    assert code == 2 and "not an atae library" in out
    assert (lib / "library.sqlite").read_bytes() == data
    assert sorted(p.name for p in lib.iterdir()) == ["library.sqlite"]


# --- renamed folders and files that are gone -------------------------------------------------------------

def test_renamed_folder_is_a_move_and_prune_removes_what_is_gone(tmp_path, sounds):
    lib = tmp_path / "lib"
    assert _cli("index", sounds, "--db", lib, "--audio-encoder", "bands")[0] == 0
    renamed = tmp_path / "renamed"
    sounds.rename(renamed)
    code, out = _cli("index", renamed, "--db", lib, "--json")
    import json

    rep = json.loads(out)["report"]
    assert (rep["new"], rep["moved"], rep["removed"]) == (0, 3, 0)
    code, out = _cli("search", "--db", lib, "--audio", renamed / "low.wav", "--paths-only", "-k", "10")
    assert sorted(out.split()) == sorted(str(renamed / f"{n}.wav") for n in FREQS)

    other = tmp_path / "other"
    write_tone(other / "gone.wav", 900.0, seconds=1.0)
    write_tone(other / "stays.wav", 1300.0, seconds=1.0)
    assert _cli("index", other, "--db", lib)[0] == 0
    shutil.rmtree(other)
    code, out = _cli("index", renamed, "--db", lib)
    assert code == 0 and "2 indexed file(s) lie in folders that no longer exist" in out
    assert f"atae prune --db {lib}" in out
    code, out = _cli("prune", "--db", lib, "--dry-run")
    assert code == 0 and "would remove 2 file(s)" in out
    code, out = _cli("prune", "--db", lib)
    assert code == 0 and "removed 2 file(s)" in out and str(other / "gone.wav") in out
    with Library.open(lib) as opened:
        assert opened.stats()["files"] == 3 and opened.index.ntotal == 3


# --- an edit in the middle of a large file ---------------------------------------------------------------

def test_edit_in_the_middle_of_a_large_file_is_re_encoded(tmp_path):
    d = tmp_path / "sounds"
    n = SR * 50  # 50 s of 8 kHz float32 stereo: 3.2 MB, more than the 2 MiB a partial hash reads
    t = np.arange(n) / SR
    low = (0.3 * np.sin(2 * np.pi * FREQS["low"] * t)).astype(np.float32)
    d.mkdir()
    big = d / "big.wav"
    sf.write(big, np.stack([low, low], axis=1), SR, subtype="FLOAT")
    write_tone(d / "mid.wav", FREQS["mid"], seconds=2.0)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel())
    lib.add([d])
    size, mtime = big.stat().st_size, big.stat().st_mtime_ns
    # same size, new content in the middle (20-30 s become a high tone), new mtime
    with sf.SoundFile(big, "r+") as f:
        f.seek(20 * SR)
        high = (0.3 * np.sin(2 * np.pi * FREQS["high"] * t[: 10 * SR])).astype(np.float32)
        f.write(np.stack([high, high], axis=1))
    os.utime(big, ns=(mtime + 10**9, mtime + 10**9))
    assert big.stat().st_size == size
    rep = lib.add([d])
    assert (rep.changed, rep.unchanged) == (1, 1)
    res = lib.search("high", k=1)[0]
    # the window over 20-30 s is now a pure high tone: the query's best match, at that time
    assert res.path == str(big) and res.start_s >= 15.0 and res.end_s <= 35.0 and res.score > 0.9
    lib.close()
