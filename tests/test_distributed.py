"""Extraction on Ray against the sequential path: the same rows, the same failures, resume after a killed
driver. One local Ray session (2 CPUs) for the file: Ray's start costs seconds, so these tests are few."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='Ray is the optional extra: pip install "atae[distributed]"')

from atae.features import FeatureStore, extract_audio  # noqa: E402
from atae.features.distributed import MARKER, WORK_DIR, extract_audio_ray, start_ray  # noqa: E402

MN04 = "data/weights/efficientat_mn04/mn04_as_mAP_432.pt"


@pytest.fixture(scope="module")
def session():
    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mn04(shared):
    from atae.towers.registry import get_audio_tower

    return get_audio_tower("efficientat-mn04", weights=shared / MN04)


def _clips(shared, n: int) -> list[tuple[str, Path]]:
    files = sorted((shared / "data/esc50/audio_16k").glob("*.ogg"))[:n]
    return [(f.name, f) for f in files]


def _rows(table) -> dict[str, tuple]:
    return {k: (np.asarray(table.get(k)), np.asarray(table.tags(k)), np.asarray(table.times(k)))
            for k in table.keys}


def test_ray_rows_equal_the_sequential_ones_and_failures_are_reported(session, shared, mn04, tmp_path):
    items = _clips(shared, 24)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    items += [("broken.wav", bad), ("gone.wav", tmp_path / "gone.wav")]
    seq = extract_audio(FeatureStore(tmp_path / "seq"), mn04, items, progress=False)
    par = extract_audio_ray(FeatureStore(tmp_path / "ray"), mn04, items, batch_size=5)
    assert (par.done, par.skipped, len(par.failed)) == (seq.done, seq.skipped, len(seq.failed)) == (24, 0, 2)
    assert sorted(p for p, _ in par.failed) == sorted(p for p, _ in seq.failed)
    a = _rows(FeatureStore(tmp_path / "seq").audio_table(mn04.info))
    b = _rows(FeatureStore(tmp_path / "ray").audio_table(mn04.info))
    assert sorted(a) == sorted(b)
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            np.testing.assert_allclose(x, y, atol=1.2e-5)  # the golden tolerance of the mn04 tower
    again = extract_audio_ray(FeatureStore(tmp_path / "ray"), mn04, items, batch_size=5)
    assert (again.done, again.skipped) == (0, 24)  # failed files are retried, stored ones skipped
    assert not list((FeatureStore(tmp_path / "ray").audio_table(mn04.info).folder / WORK_DIR).iterdir())


def test_a_killed_driver_resumes_without_losing_or_repeating_rows(session, shared, mn04, tmp_path):
    items = _clips(shared, 60)
    feats = tmp_path / "feats"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from atae.features import FeatureStore
        from atae.features.distributed import extract_audio_ray
        from atae.towers.registry import get_audio_tower
        tower = get_audio_tower("efficientat-mn04", weights={str(shared / MN04)!r})
        files = sorted(Path({str(shared / "data/esc50/audio_16k")!r}).glob("*.ogg"))[:60]
        extract_audio_ray(FeatureStore({str(feats)!r}), tower, [(f.name, f) for f in files], batch_size=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table_dir = FeatureStore(feats).audio_table(mn04.info).folder
    deadline = time.time() + 240
    try:  # kill the driver (and the local cluster it started) once some parts are in
        while time.time() < deadline and proc.poll() is None:
            shards = list(table_dir.glob("shard-*.json"))
            if len(shards) >= 2 or list((table_dir / WORK_DIR).glob(f"*{MARKER}")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stored = len(FeatureStore(feats).audio_table(mn04.info))
    assert stored < 60
    rep = extract_audio_ray(FeatureStore(feats), mn04, items, batch_size=8)
    table = FeatureStore(feats).audio_table(mn04.info)
    assert sorted(table.keys) == sorted(k for k, _ in items)  # every clip once
    assert rep.done + rep.skipped >= 60 - stored and not rep.failed
    ref = extract_audio(FeatureStore(tmp_path / "seq"), mn04, items[:6], progress=False)
    assert ref.done == 6
    seq = FeatureStore(tmp_path / "seq").audio_table(mn04.info)
    for k in seq.keys:
        np.testing.assert_allclose(table.get(k), seq.get(k), atol=1.2e-5)


def test_without_ray_the_error_names_the_extra(monkeypatch):
    import builtins

    from atae.errors import DataError
    from atae.features.distributed import require_ray

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(DataError, match=r"atae\[distributed\]"):
        require_ray()


def _library(path, tower):
    from atae.library import Library

    return Library.open(path, create=True, audio_tower=tower, long_s=6.0, window_s=2.0, hop_s=1.0)


def test_indexing_on_ray_equals_the_sequential_library(session, shared, mn04, tmp_path):
    """`atae index --engine ray`: the same files, segments, raw vectors and tags as the sequential run,
    with a broken file reported and a long file windowed; a second run encodes nothing."""
    import soundfile as sf

    src = tmp_path / "src"
    src.mkdir()
    files = sorted((shared / "data/esc50/audio_16k").glob("*.ogg"))[:10]
    for f in files:
        shutil.copy(f, src / f.name)
    wave = np.concatenate([sf.read(f)[0] for f in files[:3]])  # 15 s: windowed
    sf.write(src / "long.wav", wave, 16000)
    (src / "broken.wav").write_bytes(b"RIFF but not really")
    seq, par = _library(tmp_path / "seq", mn04), _library(tmp_path / "ray", mn04)
    a = seq.add([src])
    b = par.add([src], engine="ray", workers=1)
    assert (b.new, len(b.failed)) == (a.new, len(a.failed)) == (11, 1)

    def rows(lib):
        return {r[0]: r[1:] for r in lib.db.conn.execute(
            "SELECT f.path, s.start_s, s.end_s, s.raw, s.tags FROM segments s "
            "JOIN files f ON f.id = s.file_id ORDER BY f.path, s.seg_index")}

    ra, rb = rows(seq), rows(par)
    assert sorted(ra) == sorted(rb) and seq.db.counts()["segments"] == par.db.counts()["segments"] > 11
    for p in ra:
        assert ra[p][:2] == rb[p][:2]
        np.testing.assert_allclose(np.frombuffer(ra[p][2], np.float32), np.frombuffer(rb[p][2], np.float32),
                                   atol=1.2e-5)
    again = par.add([src], engine="ray")
    assert (again.new, again.changed, again.unchanged) == (0, 0, 12)
    assert not (tmp_path / "ray" / "ray-work").exists()
    seq.close()
    par.close()


def test_a_killed_ray_index_resumes_with_every_file_once(session, shared, mn04, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((shared / "data/esc50/audio_16k").glob("*.ogg"))[:40]:
        shutil.copy(f, src / f.name)
    lib_dir = tmp_path / "lib"
    _library(lib_dir, mn04).close()  # set up with the test's windowing; the child reopens it
    script = textwrap.dedent(f"""
        from atae.library import Library
        from atae.towers.registry import get_audio_tower
        tower = get_audio_tower("efficientat-mn04", weights={str(shared / MN04)!r})
        Library.open({str(lib_dir)!r}, audio_tower=tower).add([{str(src)!r}], engine="ray")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((lib_dir / "ray-work").glob(f"*{MARKER}")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lib = _library(lib_dir, mn04)
    assert lib.db.counts()["files"] < 40
    rep = lib.add([src], engine="ray")
    assert not rep.failed and rep.new + rep.unchanged == 40
    paths = [r[0] for r in lib.db.conn.execute("SELECT path FROM files")]
    assert len(paths) == len(set(paths)) == 40 and lib.db.counts()["segments"] == 40
    assert list(lib.index.ids()) == list(lib.db.segment_ids())
    lib.close()


def test_a_worker_that_dies_mid_batch_is_replaced_and_nothing_is_lost(session, shared, mn04, tmp_path):
    """A decode worker and a tower actor each die once in the middle of a batch (the process exits, as
    when a node is lost): Ray retries the batch on a new worker and every clip is stored once."""
    from atae.audio import load_audio

    items = _clips(shared, 12)
    victim = items[5][0]
    decode_died, tower_died = tmp_path / "decode-died", tmp_path / "tower-died"

    def dying_loader(path, sr):
        if Path(path).name == victim and not decode_died.exists():
            decode_died.touch()
            os._exit(1)
        return load_audio(path, sr)

    class DyingTower(type(mn04)):
        def encode_many(self, waves):
            if not tower_died.exists():
                tower_died.touch()
                os._exit(1)
            return super().encode_many(waves)

    dying = DyingTower.__new__(DyingTower)
    dying.__dict__.update(mn04.__dict__)
    rep = extract_audio_ray(FeatureStore(tmp_path / "ray"), dying, items, batch_size=4, loader=dying_loader)
    assert decode_died.exists() and tower_died.exists()  # both workers did die
    table = FeatureStore(tmp_path / "ray").audio_table(mn04.info)
    assert sorted(table.keys) == sorted(k for k, _ in items) and rep.done == 12 and not rep.failed
    extract_audio(FeatureStore(tmp_path / "seq"), mn04, items[4:8], progress=False)
    seq = FeatureStore(tmp_path / "seq").audio_table(mn04.info)
    for k in seq.keys:
        np.testing.assert_allclose(table.get(k), seq.get(k), atol=1.2e-5)
