"""What the `atae` command prints for hostile names (newlines, terminal control sequences) and a full
disk: one clean line, never a traceback or a sequence the terminal acts on; the rerun finishes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli_child
from atae.cli import main
from hostile_files import CONTROL_NAMES, printable_output
from library_fakes import FREQS, write_tone

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fake_towers():
    """The fake towers `bands` and `words`, registered for each test only."""
    with cli_child.towers_registered():
        yield


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output  # stdout and stderr, interleaved
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, out, r.stdout_bytes


@pytest.fixture
def named(tmp_path):
    """A folder of tones whose names hold control characters (and one corrupt file with such a name)."""
    d = tmp_path / "sounds"
    for i, name in enumerate(CONTROL_NAMES.values()):
        write_tone(d / name, FREQS["high"] if i == 0 else FREQS["low"], seconds=1.0, seed=i)
    write_tone(d / "plain.wav", FREQS["mid"], seconds=1.0)
    (d / "\x1b]2;owned\x07broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    return d


def test_newline_in_a_name_paths_only_refuses_print0_is_exact(tmp_path, named):
    lib = tmp_path / "lib"
    assert _cli("index", named, "--db", lib, "--audio-encoder", "bands")[0] == 0
    example = named / "plain.wav"
    code, out, _ = _cli("search", "--db", lib, "--audio", example, "--paths-only", "-k", "20")
    assert code == 2 and "use --print0" in out and printable_output(out)
    assert len(out.strip().splitlines()) == 1  # the error, nothing half-printed before it
    code, out, raw = _cli("search", "--db", lib, "--audio", example, "--print0", "-k", "20")
    assert code == 0
    got = raw.split(b"\0")
    assert got[-1] == b"" and sorted(got[:-1]) == sorted(
        os.fsencode(named / n) for n in [*CONTROL_NAMES.values(), "plain.wav"])
    # the table: one line per result, every name escaped
    code, out, _ = _cli("search", "--db", lib, "--audio", example, "-k", "20")
    assert code == 0 and printable_output(out)
    assert len(out.strip().splitlines()) == len(CONTROL_NAMES) + 1
    assert "two\\nlines.wav" in out and "\\x1b]2;pwned\\x07\\x1b[2Jtitle.wav" in out


def test_control_sequences_in_names_never_reach_the_terminal(tmp_path, named):
    lib = tmp_path / "lib"
    code, out, _ = _cli("index", named, "--db", lib, "--audio-encoder", "bands")
    assert code == 0 and printable_output(out)
    assert "\\x1b]2;owned\\x07broken.wav" in out  # the unreadable file's warning names it, escaped
    code, out, _ = _cli("search", "--db", lib, "--audio", named / "plain.wav", "--json", "-k", "20")
    assert code == 0 and printable_output(out)
    assert sorted(r["path"] for r in json.loads(out)) == sorted(
        str(named / n) for n in [*CONTROL_NAMES.values(), "plain.wav"])  # JSON keeps the exact names
    code, out, _ = _cli("search", "--db", lib, "--audio", named / "\x1b[2Jmissing.wav")
    assert code == 2 and "\\x1b[2Jmissing.wav" in out and printable_output(out)
    code, out, _ = _cli("index", named / "\x1b]0;t\x07nope", "--db", lib)
    assert code == 2 and printable_output(out)


# --- a full disk -----------------------------------------------------------------------------

FULL = "free space and run the same command again"


def _sounds(d: Path, n: int = 12, seconds: float = 1.0) -> Path:
    names = list(FREQS)
    for i in range(n):
        write_tone(d / f"{i:02d}_{names[i % 3]}.wav", FREQS[names[i % 3]], seconds=seconds, seed=i)
    return d


def _caption_csvs(tmp_path: Path, audio: Path) -> tuple[Path, Path]:
    rows = [f"{p.name},a {p.stem.split('_')[1]} tone,{p.stem.split('_')[1]} sound"
            for p in sorted(audio.glob("*.wav"))]
    out = []
    for split, part in (("train", rows[:8]), ("val", rows[8:])):
        p = tmp_path / f"{split}.csv"
        p.write_text("file_name,caption_1,caption_2\n" + "\n".join(part) + "\n")
        out.append(p)
    return out[0], out[1]


def test_index_on_a_full_disk_says_so_and_the_rerun_finishes(tmp_path, monkeypatch):
    """SQLite's own 'database or disk is full' (a page limit makes the disk full for SQLite)."""
    from atae.library import db as db_mod

    sounds = _sounds(tmp_path / "sounds", n=60, seconds=0.5)  # more than the new library's pages hold
    real_init = db_mod.LibraryDB.__init__

    def small_disk(self, root, *, create=False):
        real_init(self, root, create=create)
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count={pages}")

    monkeypatch.setattr(db_mod.LibraryDB, "__init__", small_disk)
    lib = tmp_path / "lib"
    code, out, _ = _cli("index", sounds, "--db", lib, "--audio-encoder", "bands")
    assert code == 2 and out.strip() == f"error: disk full at {lib / 'library.sqlite'}: {FULL}"
    monkeypatch.setattr(db_mod.LibraryDB, "__init__", real_init)
    code, out, _ = _cli("index", sounds, "--db", lib, "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["report"]["failed"] == [] and rep["library"]["files"] == 60
    con = sqlite3.connect(lib / "library.sqlite")
    paths = [r[0] for r in con.execute("SELECT path FROM files")]
    con.close()
    assert sorted(paths) == sorted(str(p) for p in sounds.glob("*.wav"))  # each file once


def test_extract_on_a_full_disk_says_so_and_the_rerun_finishes(tmp_path, monkeypatch):
    from atae.features import store
    from atae.io import atomic_open

    sounds = _sounds(tmp_path / "sounds")
    train_csv, _ = _caption_csvs(tmp_path, sounds)
    feats = tmp_path / "feats"
    real = store._atomic_npy
    calls = []

    def fills_up(path, arr):
        calls.append(path)
        if len(calls) > 2:  # the third array write finds the disk full half way
            with atomic_open(path, "wb") as f:
                f.write(b"\x93NUMPY" + b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(store, "_atomic_npy", fills_up)
    args = ("extract", "--csv", train_csv, "--audio-dir", sounds, "--out", feats, "--audio-encoder", "bands",
            "--text-encoder", "words", "--batch-size", "2", "--no-progress")
    code, out, _ = _cli(*args)
    assert code == 2 and f"disk full at {feats / 'audio'}" in out and FULL in out
    assert len(out.strip().splitlines()) == 2 and out.startswith("towers:")  # its header, then the error
    monkeypatch.setattr(store, "_atomic_npy", real)
    code, out, _ = _cli(*args)
    assert code == 0 and "0 failed" in out and "cached: 8 clips" in out, out


def test_train_on_a_full_disk_says_so_and_the_rerun_finishes(tmp_path, monkeypatch):
    from atae.train import loop

    sounds = _sounds(tmp_path / "sounds")
    train_csv, val_csv = _caption_csvs(tmp_path, sounds)
    real = loop.torch.save
    saves = []

    def fills_up(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(loop.torch, "save", fills_up)
    run = tmp_path / "run"
    args = ("train", "--recipe", "atae", "--train-csv", train_csv, "--train-audio", sounds, "--val-csv",
            val_csv, "--val-audio", sounds, "--out", run, "--audio-encoder", "bands", "--text-encoder",
            "words", "--max-epochs", "3", "--no-progress")
    code, out, _ = _cli(*args)
    last = out.strip().splitlines()[-1]
    assert code == 2 and last == f"error: disk full at {run / 'stages' / '1-clean'}: {FULL}"
    monkeypatch.setattr(loop.torch, "save", real)
    code, out, _ = _cli(*args)
    assert code == 0 and f"model saved to {run}" in out
    from atae.model import AlignedModel

    assert AlignedModel.load(run).train_summary["stages"][0]["epochs_run"] == 3


_REAL_DISK = """
set -u
mount -t tmpfs -o size={size} tmpfs "$MNT" || exit 77
for free in {frees}; do
  rm -rf "$MNT"/*
  avail=$(df --output=avail -B1 "$MNT" | tail -1)
  head -c $((avail - free)) /dev/zero > "$MNT/filler" 2>/dev/null
  echo "== free $free"
  "$PY" "$CHILD" "$@" 2>&1 | grep -v '^ready'; echo "rc=${{PIPESTATUS[0]}}"
  rm -f "$MNT/filler"
  "$PY" "$CHILD" "$@" 2>&1 | grep -v '^ready'; echo "rc=${{PIPESTATUS[0]}}"
  cp -r "$MNT/{keep}" "$OUT/{keep}-$free" 2>/dev/null
done
"""


def _on_a_real_full_disk(tmp_path, size, frees, keep, *args) -> list[tuple[str, int, str, int]]:
    """Run `atae ARGS` on a small tmpfs filled to leave each of ``frees`` bytes, then again after freeing
    it (in a private mount namespace, so nothing outlives the test). [(out, rc, out again, rc again)]."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small filesystem privately")
    mnt, out = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    env = cli_child.child_env(MNT=mnt, PY=sys.executable, CHILD=HERE / "cli_child.py", OUT=out)
    script = _REAL_DISK.format(size=size, frees=" ".join(map(str, frees)), keep=keep)
    cmd = ["unshare", "-m", "--propagation", "private", "bash", "-c", script, "bash", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 77 or "unshare failed" in r.stderr or "Operation not permitted" in r.stderr:
        pytest.skip(f"cannot mount a private tmpfs here (needs root, mount namespaces): {r.stderr.strip()}")
    runs = []
    for block in r.stdout.split("== free ")[1:]:
        out1, rest = block.split("\n", 1)[1].split("rc=", 1)
        rc1, rest = rest.split("\n", 1)
        out2, rest = rest.split("rc=", 1)
        runs.append((out1, int(rc1), out2, int(rest.split("\n", 1)[0])))
    assert len(runs) == len(frees), r.stdout + r.stderr
    return runs


def test_a_real_full_disk_during_index_and_train(tmp_path):
    sounds = _sounds(tmp_path / "sounds")
    train_csv, val_csv = _caption_csvs(tmp_path, sounds)
    mnt = tmp_path / "mnt"
    index = ("index", sounds, "--db", mnt / "lib", "--audio-encoder", "bands")
    for out, rc, again, rc2 in _on_a_real_full_disk(tmp_path, "4m", [0, 300_000], "lib", *index):
        assert rc == 2 and out.strip() == f"error: disk full at {mnt / 'lib' / 'library.sqlite'}: {FULL}"
        assert rc2 == 0 and "failed 0" in again
    runs = _on_a_real_full_disk(
        tmp_path, "32m", [14_000_000], "run", "train", "--recipe", "atae", "--train-csv", train_csv,
        "--train-audio", sounds, "--val-csv", val_csv, "--val-audio", sounds, "--out", mnt / "run",
        "--audio-encoder", "bands", "--text-encoder", "words", "--max-epochs", "3", "--no-progress")
    where = [mnt / "run" / "stages" / "1-clean"]  # a checkpoint (the features' disk is full in index)
    for (out, rc, again, rc2), place in zip(runs, where, strict=True):
        assert rc == 2 and "Traceback" not in out
        assert out.strip().splitlines()[-1].startswith(f"error: disk full at {place}") and FULL in out
        assert rc2 == 0 and f"model saved to {mnt / 'run'}" in again
    from atae.model import AlignedModel

    model = AlignedModel.load(tmp_path / "kept" / "run-14000000")
    assert model.train_summary["stages"][0]["epochs_run"] == 3
