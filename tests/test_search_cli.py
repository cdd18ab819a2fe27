"""`atae index`, `atae search` (library and dataset modes) end to end through click, with fake towers
plugged into the registry and a real saved AlignedModel whose adapters are the identity."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from click.testing import CliRunner

from atae.cli import main
from atae.towers import registry
from library_fakes import FREQS, BandTower, WordTower, write_tone


@pytest.fixture(autouse=True)
def fake_towers(monkeypatch):
    real_a, real_t = registry.get_audio_tower, registry.get_text_tower
    monkeypatch.setattr(
        registry,
        "get_audio_tower",
        lambda name, weights=None, **kw: BandTower() if name == "bands" else real_a(name, weights, **kw),
    )
    monkeypatch.setattr(
        registry,
        "get_text_tower",
        lambda name, weights=None, **kw: WordTower() if name == "words" else real_t(name, weights, **kw),
    )
    monkeypatch.setitem(registry.TEXT_TOWERS, "words", "library_fakes:WordTower")  # a registered name


@pytest.fixture
def run_dir(tmp_path):
    """A saved model whose adapters compute the identity on non-negative inputs (ReLU(I x) = x)."""
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


@pytest.fixture
def sounds(tmp_path):
    d = tmp_path / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=2.0)
    write_tone(d / "long" / "walk.wav", None, seconds=40.0, event=(22.0, 3.0, FREQS["high"]))
    return d


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_index_then_search_modes(tmp_path, sounds, run_dir):
    lib = tmp_path / "lib"
    code, out = _cli("index", sounds, "--db", lib, "--model", run_dir, "--audio-encoder", "bands")
    assert code == 0, out
    assert "new 4" in out and "failed 0" in out
    code, out = _cli("index", sounds, "--db", lib, "--model", run_dir)
    assert code == 0 and "unchanged 4" in out

    code, out = _cli("search", "--db", lib, "mid", "-k", "2")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and lines[0].split()[2].endswith("mid.wav")

    # the fake text tower knows no AudioSet label names: the trained model alone ranks by its meaning
    code, out = _cli("search", "--db", lib, "high", "--json", "-k", "4", "--scorer", "adapter")
    rows = json.loads(out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    walk = next(r for r in rows if r["path"].endswith("walk.wav"))
    assert walk["start_s"] <= 22.0 and walk["end_s"] >= 25.0 and walk["duration"] == pytest.approx(40.0)

    code, out = _cli("search", "--db", lib, "high", "--paths-only", "--min-duration", "10", "--scorer",
                     "adapter")
    assert code == 0 and out.strip().splitlines() == [str(sounds / "long" / "walk.wav")]
    code, out = _cli("search", "--db", lib, "low", "--glob", "m*.wav", "--paths-only", "--scorer", "adapter")
    assert out.strip().splitlines() == [str(sounds / "mid.wav")]

    code, out = _cli("search", "--db", lib, "--audio", sounds / "low.wav", "-k", "1", "--paths-only")
    assert code == 0 and out.strip() == str(sounds / "low.wav")
    # the human-readable line names the matching span of a windowed file
    code, out = _cli("search", "--db", lib, "high", "--max-duration", "100", "-k", "4", "--scorer", "adapter")
    assert "@ 0:" in next(line for line in out.splitlines() if "walk.wav" in line)


@pytest.mark.parametrize("args", [("",), ("   ",), ("x" * 100_000,), ("door\x00creak",), ()])
def test_bad_queries_exit_2_without_traceback(tmp_path, sounds, run_dir, args):
    lib = tmp_path / "lib"
    _cli("index", sounds, "--db", lib, "--model", run_dir, "--audio-encoder", "bands")
    r = CliRunner().invoke(main, ["search", "--db", str(lib), *args])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_missing_library_and_bad_example(tmp_path, sounds):
    code, out = _cli("search", "--db", tmp_path / "nope", "a dog")
    assert code == 2 and "atae index" in out
    lib = tmp_path / "lib"
    assert _cli("index", sounds, "--db", lib, "--audio-encoder", "bands")[0] == 0
    code, out = _cli("search", "--db", lib, "a dog", "--scorer", "adapter")
    assert code == 2 and "atae train" in out
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    code, out = _cli("search", "--db", lib, "--audio", bad)
    assert code == 2 and "bad.wav" in out


def test_unreadable_files_are_listed(tmp_path, sounds):
    (sounds / "broken.wav").write_bytes(b"RIFF....garbage")
    (sounds / "zero.flac").write_bytes(b"")
    code, out = _cli("index", sounds, "--db", tmp_path / "lib", "--audio-encoder", "bands")
    assert code == 0 and "failed 2" in out
    assert "broken.wav" in out and "zero.flac" in out


def test_second_process_refuses_then_waits(tmp_path, sounds):
    lib = tmp_path / "lib"
    assert _cli("index", sounds, "--db", lib, "--audio-encoder", "bands")[0] == 0
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(src)!r})
        from atae.library.lock import WriterLock
        lock = WriterLock({str(lib)!r}); lock.acquire()
        print("locked", flush=True)
        time.sleep(3)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out = _cli("index", sounds, "--db", lib)
        assert code == 2 and "being updated" in out and "--wait" in out
        done = {}
        th = threading.Thread(target=lambda: done.update(r=_cli("index", sounds, "--db", lib, "--wait")))
        th.start()
        th.join(timeout=60)
        assert done["r"][0] == 0 and "unchanged 4" in done["r"][1]
        # the holder releases the lock only by exiting (after its 3 s sleep): a run that really waited
        # returns as the holder exits, one that ignored the lock would return seconds earlier
        try:
            holder.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pytest.fail("the --wait run finished while another process still held the lock")
    finally:
        holder.kill()
        holder.wait()


def test_dataset_mode(tmp_path, sounds, run_dir):
    audio = tmp_path / "ds"
    for name, f in FREQS.items():
        write_tone(audio / f"clip_{name}.wav", f, seconds=1.0)
    c = tmp_path / "captions.csv"
    with open(c, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name in FREQS:
            w.writerow([f"clip_{name}.wav"] + [f"a {name} tone number {i}" for i in range(5)])
    code, out = _cli("search", run_dir, "mid", "--csv", c, "--audio-dir", audio, "-k", "3", "--json")
    assert code == 0, out
    rows = json.loads(out[out.index("[") :])
    assert [r["file_name"] for r in rows][0] == "clip_mid.wav" and len(rows) == 3
    code, out = _cli("search", run_dir, "--csv", c, "--audio-dir", audio)
    assert code == 2


def test_serve_refuses_missing_library(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--db", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["serve", "--db", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "atae index" in r.output
