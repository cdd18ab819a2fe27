"""Feature store: round trips, resume after crashes, failures as data, refusing to mix towers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from atae.errors import AudioError, DataError
from atae.features import (
    ExtractReport,
    FeatureStore,
    SequenceTable,
    caption_key,
    ensure_dataset_features,
    extract_audio,
    extract_text,
)
from atae.towers.base import AudioEncoding, AudioTower, TextTower, TowerInfo

SR = 8000
DIM = 6


def fake_seq(wave: np.ndarray, sr: int = SR, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Independent 'expected' encoder: one element per started half second, features = chunk stats."""
    half = sr // 2
    n = max(1, -(-len(wave) // half))
    rows, times = [], []
    for i in range(n):
        c = wave[i * half:(i + 1) * half].astype(np.float64)
        rows.append([c.mean(), c.std(), np.abs(c).max(), len(c) / half, i, len(wave) / sr][:dim])
        times.append([i * 0.5, min((i + 1) * 0.5, len(wave) / sr)])
    return np.asarray(rows, np.float32), np.asarray(times, np.float64)


class FakeAudioTower(AudioTower):
    name = "fake-audio"
    sample_rate = SR
    dim = DIM

    def __init__(self, crash_on_call: int | None = None, tags: bool = False, sleep: float = 0.0,
                 option: str = "a", crash_with: type[BaseException] = RuntimeError):
        self.crash_with = crash_with
        self.calls = 0
        self.encoded = 0
        self.crash_on_call = crash_on_call
        self.has_tags = tags
        self.sleep = sleep
        self.option = option

    @property
    def info(self) -> TowerInfo:
        return TowerInfo(self.name, "audio", self.dim, "0" * 64, self.sample_rate, {"opt": self.option})

    def encode(self, wave):
        seq, times = fake_seq(wave)
        tags = np.tile(seq[:, :1], (1, 527)).astype(np.float32) if self.has_tags else None
        return AudioEncoding(seq, times, tags)

    def encode_many(self, waves):
        self.calls += 1
        if self.crash_on_call is not None and self.calls == self.crash_on_call:
            raise self.crash_with("simulated crash inside the tower")
        time.sleep(self.sleep)
        self.encoded += len(waves)
        return [self.encode(w) for w in waves]


def fake_text_seq(text: str) -> np.ndarray:
    words = text.split()
    return np.asarray([[len(w), ord(w[0]), i, len(words)] for i, w in enumerate(words)], np.float32)


class FakeTextTower(TextTower):
    name = "fake-text"
    dim = 4

    def __init__(self):
        self.calls = 0

    @property
    def info(self) -> TowerInfo:
        return TowerInfo(self.name, "text", self.dim, None, None, {"layer": -2})

    def encode(self, texts):
        self.calls += 1
        return [fake_text_seq(t) for t in texts]


def sf_loader(path, sample_rate):
    """Test loader independent of atae.audio: soundfile, mono, must already be at ``sample_rate``."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"cannot decode ({e})", path=path) from e
    if x.shape[0] == 0:
        raise AudioError("empty file", path=path)
    assert sr == sample_rate
    return x.mean(axis=1)


def make_clips(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[Path, np.ndarray]]:
    """n wav files of varying length (0.2 .. 2.3 s); returns key -> (path, wave as it will be read)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        wave = (0.2 * rng.standard_normal(int(SR * (0.2 + 0.1 * (i % 22))))).astype(np.float32)
        p = folder / f"clip{i:03d}.wav"
        sf.write(p, wave, SR, subtype="FLOAT")
        out[f"clip{i:03d}.wav"] = (p, wave)
    return out


def items_of(clips):
    return [(k, p) for k, (p, _) in clips.items()]


def table_content(table: SequenceTable) -> dict:
    return {k: (np.array(table.get(k)), np.array(table.times(k))) for k in sorted(table.keys)}


# ----------------------------------------------------------------------------------------------- tests


def test_round_trip_shapes_offsets_times_tags(tmp_path):
    clips = make_clips(tmp_path / "wav", 23)
    tower = FakeAudioTower(tags=True)
    store = FeatureStore(tmp_path / "feats")
    rep = extract_audio(store, tower, items_of(clips), batch_size=5, progress=False, loader=sf_loader,
                        compact=False)
    assert (rep.done, rep.skipped, rep.failed) == (23, 0, [])
    table = store.audio_table(tower.info)
    assert table.n_shards == 5  # ceil(23 / 5) committed batches
    assert sorted(table.keys) == sorted(clips) and len(table) == 23
    for k, (_, wave) in clips.items():
        seq, times = fake_seq(wave)
        np.testing.assert_array_equal(table.get(k), seq)
        np.testing.assert_array_equal(table.times(k), times)
        np.testing.assert_array_equal(table.tags(k), np.tile(seq[:, :1], (1, 527)))
    # the folder is named by the tower identity and the manifest records it
    folder = tmp_path / "feats" / "audio" / tower.info.key()
    m = json.loads((folder / "manifest.json").read_text())
    assert m["tower"] == tower.info.to_dict() and m["sample_rate"] == SR and m["dim"] == DIM
    assert m["counts"]["keys"] == 23 and m["weights_sha256"] == "0" * 64 and m["created"]
    assert m["counts"]["rows"] == sum(len(fake_seq(w)[0]) for _, w in clips.values())


def test_memory_mapped_reads(tmp_path):
    clips = make_clips(tmp_path / "wav", 4)
    tower = FakeAudioTower()
    store = FeatureStore(tmp_path / "feats")
    extract_audio(store, tower, items_of(clips), progress=False, loader=sf_loader)
    table = store.audio_table(tower.info)
    shard = sorted(table.folder.glob("shard-*[0-9].npy"))[0]
    assert isinstance(np.load(shard, mmap_mode="r"), np.memmap)
    row = table.get("clip000.wav")
    assert isinstance(row, np.memmap) or isinstance(row.base, np.memmap)
    assert not row.flags.writeable


def test_batch_padding_and_mask(tmp_path):
    tower = FakeTextTower()
    store = FeatureStore(tmp_path)
    texts = {"a": "one", "b": "one two three four", "c": "x y"}
    extract_text(store, tower, list(texts.items()), progress=False)
    table = store.text_table(tower.info)
    z, mask = table.batch(["b", "a", "c", "a"])
    assert tuple(z.shape) == (4, 4, 4) and tuple(mask.shape) == (4, 4)
    assert z.dtype.is_floating_point and mask.dtype == __import__("torch").bool
    for i, k in enumerate(["b", "a", "c", "a"]):
        n = len(texts[k].split())
        assert mask[i].tolist() == [True] * n + [False] * (4 - n)
        np.testing.assert_array_equal(z[i, :n].numpy(), fake_text_seq(texts[k]))
        assert not z[i, n:].any()
    assert table.times("a") is None and table.tags("a") is None
    with pytest.raises(KeyError, match="nope"):
        table.get("nope")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_resume_after_crash_matches_uninterrupted(tmp_path, exc):
    clips = make_clips(tmp_path / "wav", 20)
    ref_store = FeatureStore(tmp_path / "ref")
    extract_audio(ref_store, FakeAudioTower(), items_of(clips), batch_size=4, progress=False,
                  loader=sf_loader)
    ref = table_content(ref_store.audio_table(FakeAudioTower().info))

    store = FeatureStore(tmp_path / "feats")
    crashing = FakeAudioTower(crash_on_call=3, crash_with=exc)
    with pytest.raises(exc, match="simulated crash"):
        extract_audio(store, crashing, items_of(clips), batch_size=4, progress=False, loader=sf_loader)
    assert len(store.audio_table(crashing.info)) == 8  # two committed batches survive

    again = FakeAudioTower()
    rep = extract_audio(store, again, items_of(clips), batch_size=4, progress=False, loader=sf_loader)
    assert (rep.done, rep.skipped) == (12, 8) and again.encoded == 12
    got = table_content(store.audio_table(again.info))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k][0], ref[k][0])
        np.testing.assert_array_equal(got[k][1], ref[k][1])


def test_half_written_shard_is_ignored_and_reextracted(tmp_path):
    clips = make_clips(tmp_path / "wav", 6)
    tower = FakeAudioTower()
    store = FeatureStore(tmp_path / "feats")
    extract_audio(store, tower, items_of(clips), batch_size=3, progress=False, loader=sf_loader,
                  compact=False)
    table = store.audio_table(tower.info)
    # simulate a crash between writing shard 1's data and its index
    idx = table.folder / "shard-00001.json"
    lost = json.loads(idx.read_text())["keys"]
    idx.unlink()
    (table.folder / ".shard-00002.npy.tmp-999").write_bytes(b"partial")
    table = store.audio_table(tower.info)
    assert len(table) == 3 and not any(k in table for k in lost)
    t2 = FakeAudioTower()
    rep = extract_audio(store, t2, items_of(clips), batch_size=3, progress=False, loader=sf_loader)
    assert (rep.done, rep.skipped, t2.encoded) == (3, 3, 3)
    table = store.audio_table(tower.info)
    for k in lost:
        np.testing.assert_array_equal(table.get(k), fake_seq(clips[k][1])[0])
    assert not list(table.folder.glob(".*tmp-*"))
    # the orphaned data of the uncommitted batch was removed, not left to pile up
    data = {p.name.split(".")[0] for p in table.folder.glob("shard-*.npy")}
    assert data == {p.stem for p in table.folder.glob("shard-*.json")}


def test_damaged_shard_is_reported_and_reextracted(tmp_path):
    clips = make_clips(tmp_path / "wav", 4)
    tower = FakeAudioTower()
    store = FeatureStore(tmp_path / "feats")
    extract_audio(store, tower, items_of(clips), batch_size=2, progress=False, loader=sf_loader,
                  compact=False)
    folder = store.audio_table(tower.info).folder
    (folder / "shard-00000.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="damaged shard"):
        table = store.audio_table(tower.info)
    assert len(table) == 2 and table.problems
    with pytest.warns(UserWarning):
        rep = extract_audio(store, FakeAudioTower(), items_of(clips), batch_size=2, progress=False,
                            loader=sf_loader)
    assert rep.done == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged shard was moved aside: no more warnings
        assert len(store.audio_table(tower.info)) == 4
    assert (folder / "damaged" / "shard-00000.npy").exists()


def test_bad_audio_is_listed_and_run_goes_on(tmp_path):
    clips = make_clips(tmp_path / "wav", 5)
    bad = {
        "corrupt.wav": tmp_path / "wav" / "corrupt.wav",
        "empty.wav": tmp_path / "wav" / "empty.wav",
        "missing.wav": tmp_path / "wav" / "missing.wav",
    }
    bad["corrupt.wav"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(bad["empty.wav"], np.zeros(0, np.float32), SR)
    items = items_of(clips)
    items.insert(2, ("corrupt.wav", bad["corrupt.wav"]))
    items.insert(4, ("empty.wav", bad["empty.wav"]))
    items.append(("missing.wav", bad["missing.wav"]))
    store = FeatureStore(tmp_path / "feats")
    tower = FakeAudioTower()
    rep = extract_audio(store, tower, items, batch_size=3, progress=False, loader=sf_loader)
    assert rep.done == 5
    assert sorted(p for p, _ in rep.failed) == sorted(str(p) for p in bad.values())
    assert all(reason for _, reason in rep.failed)
    table = store.audio_table(tower.info)
    assert sorted(table.failed) == sorted(bad) and not any(k in table for k in bad)
    on_disk = json.loads((table.folder / "failed.json").read_text())
    assert on_disk["missing.wav"]["path"] == str(bad["missing.wav"])
    # a later run reports them again (retrying) without crashing, and forgets a fixed one
    sf.write(bad["missing.wav"], np.ones(SR, np.float32) * 0.1, SR)
    t2 = FakeAudioTower()
    rep2 = extract_audio(store, t2, items, batch_size=3, progress=False, loader=sf_loader)
    assert (rep2.done, rep2.skipped) == (1, 5) and t2.encoded == 1
    assert sorted(p for p, _ in rep2.failed) == sorted(str(bad[k]) for k in ("corrupt.wav", "empty.wav"))
    assert sorted(store.audio_table(tower.info).failed) == ["corrupt.wav", "empty.wav"]


def test_bad_input_files_with_the_real_loader(tmp_path, write_wav):
    """The real decoder: odd rates/channels/lengths are encoded, unusable files listed; nothing lost."""
    pytest.importorskip("atae.audio")
    ok = {
        "8k.wav": write_wav("8k.wav", seconds=1.0, sr=8000),
        "96k_stereo.wav": write_wav("96k_stereo.wav", seconds=1.0, sr=96000, channels=2),
        "silent.wav": write_wav("silent.wav", seconds=1.0, sr=16000, kind="silence"),
        "twenty_min.wav": write_wav("twenty_min.wav", seconds=1200, sr=8000, subtype="PCM_16"),
    }
    bad = {"empty.wav": tmp_path / "empty.wav", "corrupt.flac": tmp_path / "corrupt.flac"}
    sf.write(bad["empty.wav"], np.zeros(0, np.float32), 16000)
    bad["corrupt.flac"].write_bytes(b"fLaC" + bytes(range(256)) * 4)
    store = FeatureStore(tmp_path / "feats")
    first = FakeAudioTower()
    extract_audio(store, first, [("8k.wav", ok["8k.wav"])], progress=False)
    before = np.array(store.audio_table(first.info).get("8k.wav"))
    tower = FakeAudioTower()
    items = [*[(k, p) for k, p in ok.items()], *[(k, p) for k, p in bad.items()]]
    rep = extract_audio(store, tower, items, batch_size=2, progress=False)
    assert rep.done == 3 and rep.skipped == 1
    assert sorted(p for p, _ in rep.failed) == sorted(str(p) for p in bad.values())
    table = store.audio_table(tower.info)
    np.testing.assert_array_equal(table.get("8k.wav"), before)  # the cached feature survived
    assert table.get("96k_stereo.wav").shape[1] == DIM
    assert table.length("twenty_min.wav") == 1200 * 2  # all of it: one fake row per half second
    assert not table.get("silent.wav")[:, :3].any()  # mean, std, max of silence


def test_manifest_mismatch_is_refused(tmp_path):
    store = FeatureStore(tmp_path)
    tower = FakeAudioTower(option="a")
    table = store.audio_table(tower.info)
    other = FakeAudioTower(option="b")
    # same folder, different tower: e.g. a renamed folder or a hash collision
    with pytest.raises(DataError, match="different tower.*options"):
        SequenceTable(table.folder, other.info)
    with pytest.raises(DataError, match="not of the audio tower"):
        extract_audio(table, other, [], progress=False, loader=sf_loader)
    (table.folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest"):
        store.audio_table(tower.info)


def test_text_extraction_reports_empty_captions(tmp_path):
    tower = FakeTextTower()
    store = FeatureStore(tmp_path)
    items = [("c#0", "a dog barks"), ("c#1", "   "), ("c#2", ""), ("c#3", "rain on a roof")]
    rep = extract_text(store, tower, items, batch_size=2, progress=False)
    assert rep.done == 2 and sorted(k for k, _ in rep.failed) == ["c#1", "c#2"]
    assert all("empty" in r for _, r in rep.failed)
    table = store.text_table(tower.info)
    np.testing.assert_array_equal(table.get("c#3"), fake_text_seq("rain on a roof"))
    assert sorted(table.failed) == ["c#1", "c#2"]


def test_compaction_keeps_content_and_reduces_shards(tmp_path):
    clips = make_clips(tmp_path / "wav", 17)
    tower = FakeAudioTower(tags=True)
    store = FeatureStore(tmp_path / "feats")
    extract_audio(store, tower, items_of(clips), batch_size=2, progress=False, loader=sf_loader,
                  compact=False)
    table = store.audio_table(tower.info)
    before = table_content(table)
    assert table.n_shards == 9
    assert table.compact(min_small=10) == 0 and table.n_shards == 9  # too few to bother
    assert table.compact() == 8 and table.n_shards == 1
    reopened = store.audio_table(tower.info)
    assert reopened.n_shards == 1 and len(list(reopened.folder.glob("shard-*.json"))) == 1
    after = table_content(reopened)
    for k in before:
        np.testing.assert_array_equal(after[k][0], before[k][0])
        np.testing.assert_array_equal(after[k][1], before[k][1])
        assert reopened.tags(k).shape == (len(before[k][0]), 527)


def test_fifty_clips_with_background_decoding(tmp_path):
    clips = make_clips(tmp_path / "wav", 50)
    for workers in (0, 1):
        tower = FakeAudioTower()
        store = FeatureStore(tmp_path / f"feats{workers}")
        rep = extract_audio(store, tower, items_of(clips), batch_size=8, progress=False,
                            num_workers=workers, loader=sf_loader)
        assert (rep.done, rep.failed) == (50, []) and tower.calls == 7
        table = store.audio_table(tower.info)
        assert table.n_shards == 1  # compacted
        for k in ("clip000.wav", "clip049.wav"):
            np.testing.assert_array_equal(table.get(k), fake_seq(clips[k][1])[0])


@dataclass
class _Clip:
    key: str
    path: Path
    captions: list[str]


@dataclass
class _Dataset:
    name: str
    clips: list


def test_ensure_dataset_features_is_idempotent(tmp_path):
    clips = make_clips(tmp_path / "wav", 7)
    ds = _Dataset("toy", [_Clip(k, p, [f"sound number {i}", "a", f"clip {k} plays"])
                          for i, (k, (p, _)) in enumerate(clips.items())])
    at, tt = FakeAudioTower(), FakeTextTower()
    audio, text, rep = ensure_dataset_features(ds, at, tt, tmp_path / "feats", progress=False,
                                               loader=sf_loader)
    assert rep.done == 7 + 21 and rep.parts["audio"].done == 7 and rep.parts["text"].done == 21
    assert caption_key("clip003.wav", 2) == "clip003.wav#2"
    np.testing.assert_array_equal(text.get("clip003.wav#2"), fake_text_seq("clip clip003.wav plays"))
    np.testing.assert_array_equal(audio.get("clip003.wav"), fake_seq(clips["clip003.wav"][1])[0])
    assert "7 extracted" in rep.parts["audio"].summary() or rep.summary()
    at2, tt2 = FakeAudioTower(), FakeTextTower()
    _, _, rep2 = ensure_dataset_features(ds, at2, tt2, tmp_path / "feats", progress=False,
                                         loader=sf_loader)
    assert (at2.calls, tt2.calls) == (0, 0)
    assert (rep2.done, rep2.skipped, rep2.failed) == (0, 28, [])
    assert isinstance(rep2, ExtractReport)


def test_clip_without_audio_is_reported(tmp_path):
    clips = make_clips(tmp_path / "wav", 2)
    ds = _Dataset("toy", [_Clip(k, p, ["a sound"]) for k, (p, _) in clips.items()]
                  + [_Clip("ghost.wav", None, ["nothing here"])])
    at = FakeAudioTower()
    audio, text, rep = ensure_dataset_features(ds, at, FakeTextTower(), tmp_path / "feats", progress=False,
                                               loader=sf_loader)
    assert rep.parts["audio"].done == 2 and rep.parts["text"].done == 3
    assert [k for k, _ in rep.failed] == ["ghost.wav"] and "not found" in rep.failed[0][1]
    assert "ghost.wav" in audio.failed and "ghost.wav#0" in text


def test_concurrent_writer_is_refused(tmp_path):
    tower = FakeTextTower()
    table = FeatureStore(tmp_path).text_table(tower.info)
    script = textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(table.folder / '.lock')!r}, 'a+')
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        print('locked', flush=True)
        time.sleep(30)
    """)
    pytest.importorskip("fcntl")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match="another process"):
            extract_text(table, tower, [("k", "text")], progress=False)
    finally:
        proc.kill()
        proc.wait()


_KILL_SCRIPT = """
import sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from test_features import FakeAudioTower, sf_loader, items_of
from atae.features import FeatureStore, extract_audio
from pathlib import Path
import soundfile as sf
clips = sorted(Path({wav!r}).glob("*.wav"))
tower = FakeAudioTower(sleep=0.05)
extract_audio(FeatureStore({feats!r}), tower, [(p.name, p) for p in clips], batch_size=2,
              progress=False, loader=sf_loader, num_workers=1)
print("finished", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX kill -9")
def test_kill_dash_nine_mid_extraction_then_resume(tmp_path):
    clips = make_clips(tmp_path / "wav", 40)
    feats = tmp_path / "feats"
    folder = feats / "audio" / FakeAudioTower().info.key()
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), wav=str(tmp_path / "wav"),
                                 feats=str(feats))
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(folder.glob("shard-*.json"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert "finished" not in out, "extraction ended before it could be killed"
    survived = FeatureStore(feats).audio_table(FakeAudioTower().info)
    assert 0 < len(survived) < 40
    n_before = len(survived)
    tower = FakeAudioTower()
    rep = extract_audio(FeatureStore(feats), tower, items_of(clips), batch_size=2, progress=False,
                        loader=sf_loader)
    assert rep.skipped == n_before and rep.done == 40 - n_before == tower.encoded
    table = FeatureStore(feats).audio_table(tower.info)
    assert len(table) == 40
    for k, (_, wave) in clips.items():
        seq, times = fake_seq(wave)
        np.testing.assert_array_equal(table.get(k), seq)
        np.testing.assert_array_equal(table.times(k), times)
    assert not list(folder.glob(".*tmp-*"))


def test_real_towers_integration(tmp_path, write_wav):
    registry = pytest.importorskip("atae.towers.registry", reason="tower registry not written yet")
    try:
        audio_tower = registry.get_audio_tower("aisfx")
        text_tower = registry.get_text_tower("minilm")
    except Exception as e:  # noqa: BLE001 - towers in progress or weights absent
        pytest.skip(f"real towers unavailable: {e}")
    a = write_wav("a.wav", seconds=1.5, sr=22050)
    b = write_wav("b.wav", seconds=3.0, sr=48000, channels=2, kind="sine")
    ds = _Dataset("real", [_Clip("a.wav", a, ["white noise hiss"]), _Clip("b.wav", b, ["a steady tone"])])
    audio, text, rep = ensure_dataset_features(ds, audio_tower, text_tower, tmp_path / "feats",
                                               progress=False)
    assert rep.failed == [] and rep.done == 4
    assert audio.get("a.wav").shape[1] == audio_tower.info.dim
    assert text.get("b.wav#0").shape[1] == text_tower.info.dim
    z, mask = text.batch(["a.wav#0", "b.wav#0"])
    assert mask.any(dim=1).all()


def test_cli_extract_summary_and_resume(tmp_path, monkeypatch):
    from click.testing import CliRunner

    registry = pytest.importorskip("atae.towers.registry")
    pytest.importorskip("atae.audio")
    from atae.cli.extract import extract

    clips = make_clips(tmp_path / "wav", 3)
    (tmp_path / "wav" / "broken.wav").write_bytes(b"not audio at all")
    csv = tmp_path / "captions.csv"
    rows = ["file_name,caption_1,caption_2"] + [f"{k},a sound {k},another one" for k in clips]
    rows.append("broken.wav,a broken file,still broken")
    csv.write_text("\n".join(rows) + "\n")
    towers = []

    def fake_audio(name, weights=None, **kw):
        towers.append(FakeAudioTower())
        return towers[-1]

    monkeypatch.setattr(registry, "get_audio_tower", fake_audio)
    monkeypatch.setattr(registry, "get_text_tower", lambda name, weights=None, **kw: FakeTextTower())
    args = ["--csv", str(csv), "--audio-dir", str(tmp_path / "wav"), "--out", str(tmp_path / "feats"),
            "--audio-encoder", "x", "--text-encoder", "y", "--no-progress"]
    res = CliRunner().invoke(extract, args)
    assert res.exit_code == 0, res.output
    assert "fake-audio-" in res.output and "fake-text-" in res.output
    assert "3 clips in" in res.output and "8 captions in" in res.output
    assert "broken.wav" in res.output and "failed" in res.output
    res2 = CliRunner().invoke(extract, args)
    assert res2.exit_code == 0, res2.output
    assert towers[-1].encoded == 0 and "0 extracted" in res2.output and "broken.wav" in res2.output


# ------------------------------------------------------------ content addressing: changed text / audio


class CountingTextTower(FakeTextTower):
    """FakeTextTower that remembers every text it encoded."""

    def __init__(self, crash_on_call: int | None = None):
        super().__init__()
        self.texts: list[str] = []
        self.crash_on_call = crash_on_call

    def encode(self, texts):
        if self.crash_on_call is not None and self.calls + 1 == self.crash_on_call:
            self.calls += 1
            raise RuntimeError("simulated crash inside the tower")
        self.texts.extend(texts)
        return super().encode(texts)


def _sha1(text: str) -> str:
    import hashlib

    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def test_changed_caption_is_reextracted_unchanged_is_not(tmp_path):
    store = FeatureStore(tmp_path)
    first = {"a#0": "a dog barks", "a#1": "rain falls", "b#0": "a car passes by", "b#1": "birds sing"}
    t1 = CountingTextTower()
    extract_text(store, t1, list(first.items()), batch_size=3, progress=False, compact=False)
    assert sorted(t1.texts) == sorted(first.values())
    second = {"a#0": "a dog barks", "a#1": "wind howls loudly", "b#0": "a car passes by", "b#1": "   "}
    t2 = CountingTextTower()
    rep = extract_text(store, t2, list(second.items()), batch_size=3, progress=False, compact=False)
    assert t2.texts == ["wind howls loudly"]  # only the changed text ran; the blank one fails
    assert (rep.done, rep.changed, rep.skipped) == (1, 1, 2)
    assert [k for k, _ in rep.failed] == ["b#1"]
    assert "1 of them changed" in rep.summary()
    for table in (store.text_table(t2.info), SequenceTable(store.text_table(t2.info).folder, t2.info)):
        np.testing.assert_array_equal(table.get("a#1"), fake_text_seq("wind howls loudly"))
        np.testing.assert_array_equal(table.get("a#0"), fake_text_seq("a dog barks"))
        assert "b#1" not in table and "b#1" in table.failed  # the stale "birds sing" row is not served
        assert table.ident("a#1") == _sha1("wind howls loudly") and len(table) == 3
    t3 = CountingTextTower()
    rep3 = extract_text(store, t3, list(second.items()), progress=False)
    assert t3.calls == 0  # the blank one is retried but never encoded
    assert (rep3.done, rep3.changed, rep3.skipped) == (0, 0, 3) and [k for k, _ in rep3.failed] == ["b#1"]
    # that run's compaction dropped the dead rows even though there were fewer than 4 small shards
    folder = store.text_table(t3.info).folder
    on_disk = sum(json.loads(p.read_text())["rows"] for p in folder.glob("shard-*.json"))
    assert on_disk == sum(len(second[k].split()) for k in ("a#0", "a#1", "b#0"))


def test_two_datasets_sharing_clip_keys_get_their_own_caption_features(tmp_path):
    clips = make_clips(tmp_path / "wav", 3)
    clean = _Dataset("clean", [_Clip(k, p, [f"clean caption of {k}"]) for k, (p, _) in clips.items()])
    noisy = _Dataset("noisy", [_Clip(k, p, [f"noisy tag {i}"])
                               for i, (k, (p, _)) in enumerate(clips.items())])
    ensure_dataset_features(clean, FakeAudioTower(), CountingTextTower(), tmp_path / "feats", progress=False,
                            loader=sf_loader)
    at, tt = FakeAudioTower(), CountingTextTower()
    _, text, rep = ensure_dataset_features(noisy, at, tt, tmp_path / "feats", progress=False,
                                           loader=sf_loader)
    assert at.calls == 0 and rep.parts["audio"].skipped == 3  # same files: audio reused
    assert sorted(tt.texts) == sorted(f"noisy tag {i}" for i in range(3)) and rep.parts["text"].changed == 3
    for i, k in enumerate(clips):
        np.testing.assert_array_equal(text.get(caption_key(k, 0)), fake_text_seq(f"noisy tag {i}"))


def test_rewritten_or_moved_audio_is_reextracted(tmp_path):
    clips = make_clips(tmp_path / "wav", 5)
    store = FeatureStore(tmp_path / "feats")
    extract_audio(store, FakeAudioTower(), items_of(clips), batch_size=2, progress=False, loader=sf_loader,
                  compact=False)
    # clip001: same length (same size on disk), different samples; mtime pushed forward explicitly so a
    # coarse filesystem clock cannot hide the rewrite
    path1, wave1 = clips["clip001.wav"]
    new1 = (-wave1[::-1]).copy()
    st = os.stat(path1)
    sf.write(path1, new1, SR, subtype="FLOAT")
    os.utime(path1, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert os.stat(path1).st_size == st.st_size
    # clip003: the key now names a different file elsewhere, same size and mtime: only the path differs
    path3, wave3 = clips["clip003.wav"]
    other = tmp_path / "elsewhere" / "clip003.wav"
    other.parent.mkdir()
    new3 = np.full(len(wave3), 0.25, np.float32)
    sf.write(other, new3, SR, subtype="FLOAT")
    st3 = os.stat(path3)
    os.utime(other, ns=(st3.st_atime_ns, st3.st_mtime_ns))
    assert (os.stat(other).st_size, os.stat(other).st_mtime_ns) == (st3.st_size, st3.st_mtime_ns)
    items = [(k, other if k == "clip003.wav" else p) for k, p in items_of(clips)]
    tower = FakeAudioTower()
    rep = extract_audio(store, tower, items, batch_size=2, progress=False, loader=sf_loader)
    assert (rep.done, rep.changed, rep.skipped, tower.encoded) == (2, 2, 3, 2)
    table = store.audio_table(tower.info)
    np.testing.assert_array_equal(table.get("clip001.wav"), fake_seq(new1)[0])
    np.testing.assert_array_equal(table.get("clip003.wav"), fake_seq(new3)[0])
    np.testing.assert_array_equal(table.times("clip003.wav"), fake_seq(new3)[1])
    np.testing.assert_array_equal(table.get("clip000.wav"), fake_seq(clips["clip000.wav"][1])[0])
    assert table.ident("clip003.wav")["path"] == os.path.abspath(other)
    again = FakeAudioTower()
    rep2 = extract_audio(store, again, items, progress=False, loader=sf_loader)
    assert (again.calls, rep2.skipped, rep2.changed) == (0, 5, 0)
    # a changed file that no longer decodes: reported, and its stale row is no longer served
    path1.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rep3 = extract_audio(store, FakeAudioTower(), items, progress=False, loader=sf_loader)
    assert [p for p, _ in rep3.failed] == [str(path1)]
    table = store.audio_table(tower.info)
    assert "clip001.wav" not in table and "clip001.wav" in table.failed and len(table) == 4
    # a file that vanished keeps its cached row (nothing better exists)
    os.unlink(other)
    gone = FakeAudioTower()
    rep4 = extract_audio(store, gone, items, progress=False, loader=sf_loader)
    assert gone.calls == 0 and (rep4.done, rep4.skipped) == (0, 4)  # clip001 retried, fails to decode
    np.testing.assert_array_equal(store.audio_table(tower.info).get("clip003.wav"), fake_seq(new3)[0])


def _strip_to_format_1(folder: Path) -> None:
    """Rewrite a store as format 1 wrote it: no idents, no deletions, manifest format 1."""
    for idx in folder.glob("shard-*.json"):
        d = json.loads(idx.read_text())
        d.pop("ident", None)
        d.pop("deleted", None)
        d["format"] = 1
        idx.write_text(json.dumps(d))
    m = json.loads((folder / "manifest.json").read_text())
    m["format"] = 1
    (folder / "manifest.json").write_text(json.dumps(m))


def test_stores_without_idents_are_upgraded(tmp_path):
    clips = make_clips(tmp_path / "wav", 4)
    store = FeatureStore(tmp_path / "feats")
    texts = [("c#0", "a dog barks"), ("c#1", "rain falls")]
    extract_text(store, FakeTextTower(), texts, progress=False)
    extract_audio(store, FakeAudioTower(), items_of(clips), progress=False, loader=sf_loader)
    tfolder = store.text_table(FakeTextTower().info).folder
    afolder = store.audio_table(FakeAudioTower().info).folder
    _strip_to_format_1(tfolder)
    _strip_to_format_1(afolder)
    assert store.text_table(FakeTextTower().info).ident("c#0") is None  # format 1 is still readable
    # captions: unknown text -> encoded once more; audio: trusted unless modified after the commit
    tt = CountingTextTower()
    rep = extract_text(store, tt, texts, progress=False)
    assert sorted(tt.texts) == ["a dog barks", "rain falls"] and rep.changed == 2
    path2, wave2 = clips["clip002.wav"]
    st = os.stat(path2)
    os.utime(path2, ns=(st.st_atime_ns, time.time_ns() + 5_000_000_000))
    at = FakeAudioTower()
    rep = extract_audio(store, at, items_of(clips), progress=False, loader=sf_loader)
    assert (at.encoded, rep.changed, rep.skipped) == (1, 1, 3)
    for folder in (tfolder, afolder):
        assert json.loads((folder / "manifest.json").read_text())["format"] == 2
    tt2, at2 = CountingTextTower(), FakeAudioTower()
    extract_text(store, tt2, texts, progress=False)
    extract_audio(store, at2, items_of(clips), progress=False, loader=sf_loader)
    assert (tt2.calls, at2.calls) == (0, 0)


def test_last_committed_shard_wins_and_compaction_keeps_only_newest(tmp_path):
    info = FakeTextTower().info
    table = FeatureStore(tmp_path).text_table(info)
    rows = {f"k{i}": np.full((i % 3 + 1, 4), float(i), np.float32) for i in range(6)}
    table.append(list(rows), list(rows.values()), idents=[f"v0-{k}" for k in rows])
    newer = {"k1": np.full((4, 4), 101.0, np.float32), "k4": np.full((1, 4), 104.0, np.float32)}
    table.append(list(newer), list(newer.values()), idents=["v1-k1", "v1-k4"])
    newest = {"k1": np.full((2, 4), 201.0, np.float32)}
    table.append(list(newest), list(newest.values()), idents=["v2-k1"], deleted=["k5"])
    want = {**rows, **newer, **newest}
    del want["k5"]
    on_disk_before = sum(json.loads(p.read_text())["rows"] for p in table.folder.glob("shard-*.json"))
    assert on_disk_before == sum(len(v) for v in (*rows.values(), *newer.values(), *newest.values()))

    def check(t):
        assert sorted(t.keys) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(t.get(k), v)
        assert t.ident("k1") == "v2-k1" and t.ident("k0") == "v0-k0"
        assert t.n_rows == sum(len(v) for v in want.values())

    check(table)
    check(SequenceTable(table.folder, info))
    # a crash after the merged shard landed but before the old ones were removed: both on disk
    backup = {p.name: p.read_bytes() for p in table.folder.glob("shard-*")}
    assert table.compact(min_small=2) == 2 and table.n_shards == 1
    check(table)
    merged = json.loads(next(table.folder.glob("shard-*.json")).read_text())
    assert merged["rows"] == sum(len(v) for v in want.values())  # superseded rows are gone
    assert merged["deleted"] == []  # no older row of k5 is left to hide
    for name, data in backup.items():
        (table.folder / name).write_bytes(data)
    check(SequenceTable(table.folder, info))


def test_compaction_keeps_a_deletion_that_still_hides_an_older_row(tmp_path):
    info = FakeTextTower().info
    table = FeatureStore(tmp_path).text_table(info)
    big = {f"b{i}": np.full((50, 4), float(i), np.float32) for i in range(10)}  # 2000 float32 = 8 KB
    table.append(list(big), list(big.values()), idents=list(big))
    for i in range(3):
        table.append([f"s{i}"], [np.ones((1, 4), np.float32)], idents=[f"s{i}"])
    table.append([], [], deleted=["b3"])
    # with 16 KB merged shards, the 8 KB one is not small (>= 2 KB) and has few dead rows: kept
    assert table.compact(target_bytes=16 << 10, min_small=2) == 3
    reopened = SequenceTable(table.folder, info)
    assert "b3" not in reopened and len(reopened) == 12 and reopened.n_shards == 2
    np.testing.assert_array_equal(reopened.get("b4"), big["b4"])
    files = sorted(p.name for p in table.folder.glob("shard-*"))
    assert table.compact(target_bytes=16 << 10, min_small=2) == 0  # nothing left to gain: no rewrite
    assert sorted(p.name for p in table.folder.glob("shard-*")) == files


def test_crash_while_reextracting_changed_captions_then_resume(tmp_path):
    store = FeatureStore(tmp_path)
    old = [(f"k#{i}", f"old caption number {i}") for i in range(10)]
    new = [(f"k#{i}", f"new words {i} here") for i in range(10)]
    extract_text(store, FakeTextTower(), old, batch_size=4, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_text(store, CountingTextTower(crash_on_call=2), new, batch_size=4, progress=False)
    table = store.text_table(FakeTextTower().info)
    for i in range(10):  # each key is either fully old or fully new, never mixed
        got = np.array(table.get(f"k#{i}"))
        want = fake_text_seq(new[i][1]) if i < 4 else fake_text_seq(old[i][1])
        np.testing.assert_array_equal(got, want)
    tt = CountingTextTower()
    rep = extract_text(store, tt, new, batch_size=4, progress=False)
    assert sorted(tt.texts) == sorted(t for _, t in new[4:]) and (rep.changed, rep.skipped) == (6, 4)
    table = store.text_table(FakeTextTower().info)
    for k, t in new:
        np.testing.assert_array_equal(table.get(k), fake_text_seq(t))
