"""The best tower by default, what is installed (`atae info`), and a model that finds the tower weights it
was trained with again, by SHA-256."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from click.testing import CliRunner

from atae.cli import main
from atae.errors import WeightsError
from atae.towers import registry
from atae.towers.base import TowerInfo
from atae.towers.trained_with import weights_for
from library_fakes import FREQS, BandTower, LabelWordTower, write_tone

MN04 = "data/weights/efficientat_mn04/mn04_as_mAP_432.pt"
MN04_SHA = "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "atae-home"
    h.mkdir()
    monkeypatch.setenv("ATAE_HOME", str(h))
    return h


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_are_found_again_by_sha256(home, tmp_path):
    a = tmp_path / "old" / "mine.pt"
    a.parent.mkdir()
    a.write_bytes(b"weights the model was trained with" * 10)
    info = TowerInfo("efficientat-mn04", "audio", 384, _sha(a), 32000)
    assert weights_for(info, remembered=a) == a
    # moved into the weights folder under another name: still found
    moved = home / "weights" / "efficientat-mn04" / "renamed.pt"
    moved.parent.mkdir(parents=True)
    shutil.move(a, moved)
    assert weights_for(info, remembered=a) == moved
    # only another file where the registry looks: refused, naming it, with both hashes shortened
    other = home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt"
    other.write_bytes(b"other weights")
    moved.unlink()
    with pytest.raises(WeightsError) as e:
        weights_for(info, remembered=a)
    msg = str(e.value)
    assert f"last seen at {a}" in msg and str(other) in msg and _sha(other)[:12] in msg
    assert "restore the original file" in msg  # not the registry's file: fetching would not help
    with pytest.raises(WeightsError, match="are not the ones"):
        weights_for(info, explicit=other)
    # the registry's own mn04: fetching it is the fix
    with pytest.raises(WeightsError, match="atae weights fetch efficientat-mn04"):
        weights_for(TowerInfo("efficientat-mn04", "audio", 384, MN04_SHA, 32000))


def test_weights_list_shows_each_sha256(home):
    code, out = _cli("weights", "list")
    block = out[out.index("efficientat-mn04"):out.index("efficientat-mn05")]
    assert code == 0 and f"sha256: {MN04_SHA}" in block


def test_index_defaults_to_the_best_tower_and_says_what_mn04_would_give(home, tmp_path, monkeypatch):
    assert registry.best_audio_tower() == "aisfx"  # ships with the install; mn04 not fetched
    chosen = []

    def audio(name, weights=None, **kw):
        chosen.append(name)
        return BandTower()

    monkeypatch.setattr(registry, "get_audio_tower", audio)
    d = tmp_path / "s"
    write_tone(d / "a.wav", FREQS["low"])
    code, out = _cli("index", d, "--db", tmp_path / "lib")
    assert code == 0 and chosen == ["aisfx"]
    assert out.count("atae weights fetch efficientat-mn04") == 1 and "(4 MB)" in out
    code, out = _cli("index", d, "--db", tmp_path / "lib")  # the library keeps its tower: no advice
    assert code == 0 and "weights fetch" not in out


def test_info_lists_towers_and_libraries(home, tmp_path, monkeypatch):
    code, out = _cli("info")
    assert code == 0
    mn04 = out[out.index("efficientat-mn04"):out.index("cnn14")]
    assert "not installed" in mn04 and "atae weights fetch efficientat-mn04 (4 MB)" in mn04
    aisfx = out[out.index("  aisfx"):out.index("text towers")]
    assert "installed  <- atae index uses this" in aisfx and "no tags" in aisfx

    from atae.library import Library

    d = tmp_path / "s"
    write_tone(d / "a.wav", FREQS["low"])
    towers = {"audio_tower": BandTower(), "text_tower": LabelWordTower()}
    with Library.open(tmp_path / "lib", create=True, **towers) as lib:
        lib.add([d])
    code, out = _cli("doctor", "--db", tmp_path / "lib")
    assert code == 0 and "1 files" in out
    assert "zero-shot tags (bridge)  <- default" in out
    assert "trained model (adapter): not available, needs a trained model" in out


@pytest.fixture
def mn04_model(shared, home, tmp_path):
    """A model trained on a private copy of the mn04 weights (remembered by path), ATAE_HOME empty."""
    from atae.model import AlignedModel
    from atae.towers.registry import get_audio_tower

    copy = tmp_path / "mine" / "mn04.pt"
    copy.parent.mkdir()
    shutil.copy(shared / MN04, copy)
    tower = get_audio_tower("efficientat-mn04", weights=copy)
    m = AlignedModel(tower.info, LabelWordTower().info, hidden=16, out_dim=16)
    m.weights_files = {"audio": str(copy)}
    m.save(tmp_path / "run")
    return tmp_path / "run", copy


def test_a_model_finds_its_tower_weights_again(mn04_model, tmp_path):
    from atae.evaluate import towers_for_model
    from atae.library import Library
    from atae.library.warm import warm_up
    from atae.model import AlignedModel

    run, copy = mn04_model
    audio, _ = towers_for_model(AlignedModel.load(run), need_text=False)
    assert audio.weights_path == copy
    d = tmp_path / "s"
    write_tone(d / "a.wav", FREQS["low"], sr=32000)
    lib = Library.open(tmp_path / "lib", create=True, model=run, text_tower=LabelWordTower())
    assert lib.add([d]).new == 1 and lib.stats()["audio_tower"] == "efficientat-mn04"
    lib.close()
    code, out = _cli("info", "--model", run)
    assert code == 0 and f"audio tower efficientat-mn04: weights here: {copy}" in out

    # the file goes away: the server says so at start, and info says how to get it back
    copy.unlink()
    lib = Library.open(tmp_path / "lib", text_tower=LabelWordTower())
    problems = warm_up(lib)
    lib.close()
    assert any("search by an example sound is not ready" in p and f"last seen at {copy}" in p
               and "atae weights fetch efficientat-mn04" in p for p in problems)
    code, out = _cli("info", "--model", run)
    assert code == 0 and "are not on this machine" in out


def test_best_tower_is_mn04_once_fetched(shared, home, tmp_path, monkeypatch):
    target = home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt"
    target.parent.mkdir(parents=True)
    target.symlink_to(shared / MN04)
    assert registry.best_audio_tower() == "efficientat-mn04"
    d = tmp_path / "s"
    write_tone(d / "a.wav", FREQS["low"], sr=32000)
    code, out = _cli("index", d, "--db", tmp_path / "lib")
    assert code == 0 and "weights fetch" not in out
    from atae.library import Library

    with Library.open(tmp_path / "lib") as lib:
        assert lib.stats()["audio_tower"] == "efficientat-mn04" and "bridge" in lib.scorers()["available"]


def test_a_text_tower_is_rebuilt_with_its_layer_and_from_its_local_folder(tmp_path):
    """What a model records of its text tower is what comes back: the layer it read, and a local model
    folder (not a registry name) from where the model last saw it; a folder that is gone is a clear error."""
    from atae import weights as W
    from atae.errors import ModelError
    from atae.towers.trained_with import text_tower_for

    try:
        folder = W.resolve("minilm")
    except WeightsError as exc:
        pytest.skip(f"minilm is not installed: {exc}")
    last = registry.get_text_tower("minilm", layer=-1)
    again = text_tower_for(last.info)
    assert again.info.key() == last.info.key() and again.layer == -1

    local = tmp_path / "my-minilm"
    shutil.copytree(folder, local)
    own = registry.get_text_tower(str(local), layer=-1)
    assert own.info.name not in registry.TEXT_TOWERS
    again = text_tower_for(own.info, remembered=local)
    assert again.info.key() == own.info.key()
    assert again.encode(["a dog barks"])[0].tolist() == own.encode(["a dog barks"])[0].tolist()
    with pytest.raises(ModelError, match="--text-weights"):
        text_tower_for(own.info)
    shutil.rmtree(local)
    with pytest.raises(ModelError, match=f"last seen at {local}"):
        text_tower_for(own.info, remembered=local)
