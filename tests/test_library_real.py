"""The library with the real offline towers (aisfx + minilm): what is stored and searched equals what
the towers and the model compute when called directly. Skips when the towers are not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atae.library import Library
from library_fakes import write_tone


@pytest.fixture(scope="module")
def towers():
    try:
        from atae.towers.registry import get_audio_tower, get_text_tower

        return get_audio_tower("aisfx"), get_text_tower("minilm")
    except Exception as exc:  # noqa: BLE001 - any missing piece means: skip
        pytest.skip(f"real towers unavailable: {exc}")


@pytest.fixture(scope="module")
def real_lib(tmp_path_factory, towers):
    audio_tower, text_tower = towers
    from atae.model import AlignedModel

    tmp = tmp_path_factory.mktemp("real")
    d = tmp / "sounds"
    for i, f in enumerate([300.0, 900.0, 2500.0]):
        write_tone(d / f"tone_{int(f)}.wav", f, seconds=3.0, sr=22050, seed=i)
    write_tone(d / "noise.wav", None, seconds=3.0, sr=44100)
    write_tone(d / "long.wav", None, seconds=40.0, sr=16000, event=(20.0, 3.0, 1500.0))
    torch.manual_seed(0)
    model = AlignedModel(audio_tower.info, text_tower.info)
    model.save(tmp / "run")
    lib = Library.open(
        tmp / "lib", create=True, audio_tower=audio_tower, text_tower=text_tower, model=tmp / "run"
    )
    rep = lib.add([d])
    assert rep.new == 5 and rep.failed == []
    yield lib, d, AlignedModel.load(tmp / "run")
    lib.close()


def test_stored_sequences_are_the_towers(real_lib, towers):
    from atae.audio import load_audio

    lib, d, _ = real_lib
    audio_tower, _ = towers
    fid = lib.db.conn.execute("SELECT id FROM files WHERE path=?", (str(d / "tone_900.wav"),)).fetchone()[0]
    sid = lib.db.conn.execute("SELECT id FROM segments WHERE file_id=?", (fid,)).fetchone()[0]
    ((_, [stored]),) = list(lib.db.iter_raw(np.array([sid])))
    direct = audio_tower.encode(load_audio(d / "tone_900.wav", audio_tower.sample_rate)).seq
    assert stored.shape == direct.shape and np.allclose(stored, direct, atol=1e-5)
    # 40 s file -> windows of 10 s every 5 s: starts 0, 5, ..., 30 = 7 windows
    n = lib.db.conn.execute(
        "SELECT count(*) FROM segments s JOIN files f ON f.id = s.file_id WHERE f.path = ?",
        (str(d / "long.wav"),),
    ).fetchone()[0]
    assert n == 7


def test_text_score_equals_model_cosine(real_lib, towers):
    from atae.audio import load_audio

    lib, d, model = real_lib
    audio_tower, text_tower = towers
    res = lib.search("a low hum", k=5)
    assert len(res) == 5
    top = next(r for r in res if r.path.endswith(".wav") and "tone" in r.path)
    with torch.no_grad():
        t = torch.from_numpy(text_tower.encode(["a low hum"])[0])[None]
        q = model.embed_text(t, torch.ones(1, t.shape[1], dtype=torch.bool), normalize=True)[0]
        a = torch.from_numpy(audio_tower.encode(load_audio(top.path, audio_tower.sample_rate)).seq)[None]
        v = model.embed_audio(a, torch.ones(1, a.shape[1], dtype=torch.bool), normalize=True)[0]
    assert top.score == pytest.approx(float(q @ v), abs=1e-4)


def test_query_by_example_finds_itself(real_lib):
    lib, d, _ = real_lib
    for name in ("tone_300.wav", "tone_2500.wav", "noise.wav"):
        r = lib.search(audio=d / name, k=1)[0]
        assert r.path.endswith(name) and r.score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.shared
def test_zero_shot_bridge_on_esc50(tmp_path, shared):
    """A library indexed with a tagging tower answers text queries with no training (AudioSet tags)."""
    import csv

    try:
        from atae.towers.registry import get_audio_tower, get_text_tower

        weights = shared / "data" / "weights" / "efficientat_mn04" / "mn04_as_mAP_432.pt"
        tower = get_audio_tower("efficientat-mn04", weights=weights)
        get_text_tower("minilm")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"efficientat-mn04 or minilm unavailable: {exc}")
    meta = list(csv.DictReader(open(shared / "data" / "esc50" / "meta" / "esc50.csv")))
    picked = {}
    for row in meta:
        if row["category"] in ("dog", "rain", "church_bells") and len(picked.get(row["category"], [])) < 3:
            picked.setdefault(row["category"], []).append(row["filename"].replace(".wav", ".ogg"))
    files = [shared / "data" / "esc50" / "audio_16k" / f for fs in picked.values() for f in fs]
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=tower)
    assert lib.add(files).new == 9
    for query, cat in (("a dog barking", "dog"), ("church bells ringing", "church_bells")):
        top = lib.search(query, scorer="bridge", k=1)[0]
        assert top.path.rsplit("/", 1)[-1] in picked[cat], (query, top.path)


def test_a_reopened_library_rebuilds_the_text_tower_the_model_was_trained_with(tmp_path, towers):
    """A model trained on MiniLM's last layer (not the default penultimate one): a library that builds its
    own text tower must build that one, or every query is scored in the wrong space."""
    from atae.model import AlignedModel
    from atae.towers.registry import get_text_tower

    audio_tower, _ = towers
    last = get_text_tower("minilm", layer=-1)
    torch.manual_seed(0)
    model = AlignedModel(audio_tower.info, last.info)
    model.save(tmp_path / "run")
    d = tmp_path / "s"
    write_tone(d / "tone.wav", 440.0, seconds=3.0, sr=22050)
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=audio_tower, text_tower=last,
                       model=tmp_path / "run")
    assert lib.add([d]).new == 1
    lib.close()
    lib = Library.open(tmp_path / "lib")  # no towers given: the library rebuilds them from the records
    try:
        (hit,) = lib.search("a high beep", k=1)
    finally:
        lib.close()
    (q,) = model.encode_text(last.encode(["a high beep"]))
    from atae.audio import load_audio

    (v,) = model.encode_audio([audio_tower.encode(load_audio(d / "tone.wav", audio_tower.sample_rate)).seq])
    assert hit.score == pytest.approx(float(q @ v), abs=1e-4)


def test_a_library_refuses_a_text_tower_with_other_options_than_the_model(tmp_path, towers):
    from atae.errors import AtaeError
    from atae.model import AlignedModel
    from atae.towers.registry import get_text_tower

    audio_tower, text_tower = towers  # minilm, penultimate layer
    model = AlignedModel(audio_tower.info, get_text_tower("minilm", layer=-1).info)
    model.save(tmp_path / "run")
    lib = Library.open(tmp_path / "lib", create=True, audio_tower=audio_tower, text_tower=text_tower,
                       model=tmp_path / "run")
    try:
        with pytest.raises(AtaeError, match="text tower"):
            lib.search("a high beep", k=1)
    finally:
        lib.close()
