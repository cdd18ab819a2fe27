"""Scorers everywhere (issue 5): tuned values stored in the model directory, `atae tune`, and the library's
fast bridge / hybrid search checked against a brute-force dense computation written out here."""

from __future__ import annotations

import csv
import json
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atae import bridge as br
from atae.cli import main
from atae.model import AlignedModel
from atae.towers import registry
from atae.towers.base import TextTower, TowerInfo
from library_fakes import FREQS, BandTower, WordTower, write_tone, write_tone_mix
from train_fakes import AUDIO_INFO, FakeClip, FakeDataset, FakeTable, make_world

LABELS = br.audioset_labels()


class HashTower(TextTower):
    """Each word a fixed random 32-d vector (seeded by its crc32), so texts sharing words are similar."""

    name = "hash"
    dim = 32

    @property
    def info(self) -> TowerInfo:
        return TowerInfo("hash", "text", 32, "hash-sha", None, {})

    def encode(self, texts):
        return [np.stack([_word(w) for w in _words(t)] or [np.zeros(32, np.float32)]) for t in texts]


def _words(t: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in t).split()


def _word(w: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(w.encode())).standard_normal(32).astype(np.float32)


def _sentence(t: str) -> np.ndarray:
    v = np.mean([_word(w) for w in _words(t)], axis=0).astype(np.float64)
    return v / np.linalg.norm(v)


def _label_matrix() -> np.ndarray:
    return np.stack([_sentence(br.DEFAULT_TEMPLATE.format(label=lab)) for lab in LABELS])


def _dist(text: str, temperature: float, labels: np.ndarray) -> np.ndarray:
    z = labels @ _sentence(text) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _map10(scores: np.ndarray, rel) -> float:
    """DCASE 2022 mAP@10 by hand: 1/rank of the relevant clip if within the top 10 (ties: earlier first)."""
    out = []
    for q, j in enumerate(rel):
        s = scores[q]
        rank = 1 + int(np.sum(s > s[j])) + int(np.sum(s[:j] == s[j]))
        out.append(1.0 / rank if rank <= 10 else 0.0)
    return float(np.mean(out))


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=1, keepdims=True)
    return np.where(sd > 1e-12, (x - x.mean(axis=1, keepdims=True)) / np.where(sd > 1e-12, sd, 1), 0.0)


# ------------------------------------------------------------------------------------ tuning by hand
class TaggedTable(FakeTable):
    def __init__(self, info, rows, tags):
        super().__init__(info, rows)
        self._tags = tags

    def tags(self, key):
        return self._tags.get(key)


def _tag_world(seed: int = 0, n: int = 24):
    """Clips whose tags peak on one AudioSet label; captions name that label (bridge signal) for some clips
    and only carry adapter signal (token rows near the clip's audio rows) for others."""
    rng = np.random.default_rng(seed)
    info_a = TowerInfo("bands", "audio", 16, "fake-sha", 8000, {})
    info_t = TowerInfo("words", "text", 16, "fake-sha-t", None, {})
    arows, trows, tags, clips = {}, {}, {}, []
    for j in range(n):
        key = f"c{j:02d}.wav"
        lab = int(rng.integers(0, 527))
        a = np.abs(rng.standard_normal((3, 16))).astype(np.float32)
        arows[key] = a
        t = (0.02 * rng.random((2, 527))).astype(np.float32)
        t[:, lab] += 0.5 + 0.4 * rng.random()
        tags[key] = t
        caps = []
        for i in range(2):
            good_bridge = (j + i) % 3 != 0
            caps.append(f"{LABELS[lab] if good_bridge else 'something'} {i}")
            noise = 1.5 if (j + i) % 2 else 0.1  # the adapter is informative on half of the captions
            trows[f"{key}#{i}"] = np.abs(a.mean(0) + noise * rng.standard_normal((2, 16))).astype(np.float32)
        clips.append(FakeClip(key, None, caps))
    return FakeDataset("val", clips), TaggedTable(info_a, arows, tags), FakeTable(info_t, trows)


def _identity_model(info_a, info_t) -> AlignedModel:
    m = AlignedModel(info_a, info_t, hidden=16, out_dim=16)
    with torch.no_grad():
        for ad in (m.audio_adapter, m.text_adapter):
            for lin in (ad.fc1, ad.fc2):
                lin.weight.copy_(torch.eye(16))
                lin.bias.zero_()
    return m


def _brute_force(ds, atab, ttab):
    """(best temperature, best weight) by plain grid loops; adapter = cosine of mean rows (identity MLP)."""
    cands = [c.key for c in ds.clips]
    texts, rel, tk = [], [], []
    for j, c in enumerate(ds.clips):
        for i, cap in enumerate(c.captions):
            texts.append(cap)
            rel.append(j)
            tk.append(f"{c.key}#{i}")
    labels = _label_matrix()
    tags = np.stack([atab.tags(k).mean(0) for k in cands]).astype(np.float64)
    best_t, best_m = None, -1.0
    for t in br.TEMPERATURE_GRID:
        s = np.stack([tags @ _dist(q, t, labels) for q in texts])
        m = _map10(s, rel)
        if m > best_m + 1e-12:
            best_t, best_m = t, m
    b = np.stack([tags @ _dist(q, best_t, labels) for q in texts])
    au = np.stack([atab.get(k).mean(0) for k in cands])
    au /= np.linalg.norm(au, axis=1, keepdims=True)
    tx = np.stack([ttab.get(k).mean(0) for k in tk])
    tx /= np.linalg.norm(tx, axis=1, keepdims=True)
    a = tx @ au.T
    best_w, best_wm, curve = None, -1.0, []
    for w in br.WEIGHT_GRID:
        m = _map10(w * _z(a) + (1 - w) * _z(b), rel)
        curve.append(m)
        if m > best_wm + 1e-12:
            best_w, best_wm = w, m
    return best_t, best_w, curve


def test_tune_on_dataset_matches_brute_force_grid_loops():
    from atae.tuning import tune_on_dataset

    ds, atab, ttab = _tag_world(0)
    model = _identity_model(atab.info, ttab.info)
    exp_t, exp_w, curve = _brute_force(ds, atab, ttab)
    assert max(curve) > min(curve)  # the weight matters on this data, so the choice is informative
    got = tune_on_dataset(ds, atab, HashTower(), model=model, text_table=ttab)
    assert got[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t
    assert got[br.EXTRA_HYBRID_WEIGHT] == exp_w
    only_t = tune_on_dataset(ds, atab, HashTower(), scorer="bridge")
    assert only_t[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t and br.EXTRA_HYBRID_WEIGHT not in only_t


def test_tune_after_training_stores_values_and_skips_towers_without_head(tmp_path):
    from atae.tuning import EXTRA_TUNED_ON, tune_after_training

    ds, atab, ttab = _tag_world(1)
    model = _identity_model(atab.info, ttab.info)
    model.save(tmp_path / "run")
    exp_t, exp_w, _ = _brute_force(ds, atab, ttab)
    out = tune_after_training(model, (ds, atab, ttab), tmp_path / "run", text_tower=HashTower())
    assert out == {br.EXTRA_BRIDGE_TEMPERATURE: exp_t, br.EXTRA_HYBRID_WEIGHT: exp_w}
    loaded = AlignedModel.load(tmp_path / "run")
    assert loaded.extras[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t and br.hybrid_weight(loaded) == exp_w
    assert loaded.extras[EXTRA_TUNED_ON]["n_queries"] == 2 * len(ds.clips)
    # no AudioSet tags: nothing tuned, nothing written
    plain = FakeTable(atab.info, {k: atab.get(k) for k in atab.keys})
    m2 = _identity_model(atab.info, ttab.info)
    assert "skipped" in tune_after_training(m2, (ds, plain, ttab), tmp_path / "r2", text_tower=HashTower())
    assert m2.extras == {} and not (tmp_path / "r2").exists()


def test_run_recipe_calls_the_tuning_hook(tmp_path, monkeypatch):
    from atae import tuning
    from atae.train import run_recipe

    world, atab, ttab, _ = make_world(0, splits=(("train", 16), ("val", 8)))
    tagged = TaggedTable(AUDIO_INFO, {k: atab.get(k) for k in atab.keys}, {})
    seen = []
    monkeypatch.setattr(tuning, "tune_after_training",
                        lambda model, val_src, out, text_tower=None: seen.append((val_src, out, text_tower))
                        or {"skipped": "test"})
    tower = HashTower()
    res = run_recipe("atae", world["train"], world["val"], None, tagged, ttab, tmp_path / "run", seed=1,
                     max_epochs=1, hidden=16, out_dim=8, batch_size=8, text_tower=tower)
    assert len(seen) == 1 and seen[0][0][0] is world["val"] and seen[0][0][1] is tagged
    assert seen[0][2] is tower and res.summary["tuning"] == {"skipped": "test"}


# ------------------------------------------------------------------------------------ CLI: atae tune
@pytest.fixture
def fake_registry(monkeypatch):
    real_a, real_t = registry.get_audio_tower, registry.get_text_tower
    def audio(name, weights=None, **kw):
        return BandTower() if name == "bands" else real_a(name, weights, **kw)

    def text(name, weights=None, **kw):
        return WordTower() if name == "words" else real_t(name, weights, **kw)

    monkeypatch.setattr(registry, "get_audio_tower", audio)
    monkeypatch.setattr(registry, "get_text_tower", text)
    monkeypatch.setitem(registry.TEXT_TOWERS, "words", "unused")


def _caption_set(tmp_path):
    audio = tmp_path / "val"
    for name, f in FREQS.items():
        write_tone(audio / f"clip_{name}.wav", f, seconds=1.0)
    c = tmp_path / "val.csv"
    with open(c, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name in FREQS:
            w.writerow([f"clip_{name}.wav"] + [f"a {name} tone {i}" for i in range(5)])
    return c, audio


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_cli_tune_run_stores_values_and_bridge_mode_writes_json(tmp_path, fake_registry):
    c, audio = _caption_set(tmp_path)
    run = tmp_path / "run"
    _identity_model(BandTower().info, WordTower().info).save(run)
    code, out = _cli("tune", run, "--csv", c, "--audio-dir", audio, "--json", tmp_path / "t.json",
                     "--no-progress")
    assert code == 0, out
    cfg = json.loads((run / "config.json").read_text())["extras"]
    rep = json.loads((tmp_path / "t.json").read_text())
    assert cfg[br.EXTRA_BRIDGE_TEMPERATURE] == rep[br.EXTRA_BRIDGE_TEMPERATURE] in br.TEMPERATURE_GRID
    assert cfg[br.EXTRA_HYBRID_WEIGHT] == rep[br.EXTRA_HYBRID_WEIGHT] in br.WEIGHT_GRID
    assert f"best temperature: {rep[br.EXTRA_BRIDGE_TEMPERATURE]:g}" in out
    # the identity adapter is perfect on "a {name} tone": the best hybrid weight gives mAP@10 = 1
    assert dict(map(tuple, rep["weight_curve"]))[rep[br.EXTRA_HYBRID_WEIGHT]] == 1.0
    code, out = _cli("tune", "--scorer", "bridge", "--audio-encoder", "bands", "--text-encoder", "words",
                     "--csv", c, "--audio-dir", audio, "--feats", tmp_path / "f",
                     "--json", tmp_path / "b.json", "--no-progress")
    assert code == 0, out
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["scorer"] == "bridge" and br.EXTRA_HYBRID_WEIGHT not in b
    assert f"best temperature: {b[br.EXTRA_BRIDGE_TEMPERATURE]:g}" in out


def test_cli_tune_bad_input_exits_2(tmp_path, fake_registry):
    c, audio = _caption_set(tmp_path)
    code, out = _cli("tune", "--csv", c, "--audio-dir", audio, "--scorer", "hybrid")
    assert code == 2 and "trained model" in out and "Traceback" not in out
    code, out = _cli("tune", "--csv", c, "--audio-dir", audio)
    assert code == 2 and "--audio-encoder" in out


# ------------------------------------------------------------------------------------ library fast path
@pytest.fixture(scope="module")
def big_lib(tmp_path_factory):
    from atae.library import Library
    from library_fakes import IdentityModel

    root = tmp_path_factory.mktemp("biglib")
    for i, name in enumerate("abcde"):
        write_tone_mix(root / "sounds" / f"{name}.wav", 40.0, seed=i)
    lib = Library.open(root / "lib", create=True, audio_tower=BandTower(), text_tower=WordTower(),
                       model=IdentityModel(), long_s=2.0, window_s=0.5, hop_s=0.25)
    lib.add([root / "sounds"])
    lib.model.extras = {br.EXTRA_BRIDGE_TEMPERATURE: 0.02, br.EXTRA_HYBRID_WEIGHT: 0.3}
    yield lib
    lib.close()


def _dense(lib, text, temperature, weight=None):
    """Brute force over every segment: ids, bridge scores (and hybrid scores if ``weight``)."""
    rows = lib.db.conn.execute("SELECT id, tags FROM segments WHERE tags IS NOT NULL ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows])
    tags = np.stack([np.frombuffer(r[1], np.float16) for r in rows]).astype(np.float64)
    b = tags @ _dist(text, temperature, _label_matrix())
    if weight is None:
        return ids, b
    import faiss

    vi = lib.index
    all_ids = faiss.vector_to_array(vi.index.id_map)
    vecs = vi.index.index.reconstruct_n(0, vi.ntotal).astype(np.float64)
    v = vecs[[int(np.nonzero(all_ids == i)[0][0]) for i in ids]]
    q = np.zeros(16)
    for w in text.split():
        if w in FREQS:
            q[int(FREQS[w] // 250)] += 1
    a = v @ (q / np.linalg.norm(q))
    return ids, (weight * _z(a[None]) + (1 - weight) * _z(b[None]))[0]


def _assert_exact_top(got_ids, got_scores, ids, dense, n):
    """Exact top-n up to float ties: the same sorted scores, and each returned id scores what it should."""
    exp = np.sort(dense)[::-1][:n]
    assert len(got_ids) == n and len(set(got_ids.tolist())) == n
    np.testing.assert_allclose(got_scores, exp, rtol=1e-4, atol=1e-6)
    pos = {int(i): j for j, i in enumerate(ids)}
    np.testing.assert_allclose(dense[[pos[int(i)] for i in got_ids]], got_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("query", ["high laughter", "low male speech", "mid whispering and shout"])
def test_library_bridge_and_hybrid_top_equal_dense(big_lib, query):
    from atae.library.scorers import BridgeScorer, HybridScorer

    n_seg = big_lib.db.counts()["segments"]
    assert n_seg > 600  # enough segments for the index to skip most of them
    bs, hs = BridgeScorer(text_tower=HashTower()), HybridScorer(text_tower=HashTower())
    ids, dense = _dense(big_lib, query, 0.02)
    hids, hdense = _dense(big_lib, query, 0.02, weight=0.3)
    for n in (5, 64):
        _assert_exact_top(*bs.top(big_lib, query, n), ids, dense, n)
        _assert_exact_top(*hs.top(big_lib, query, n), hids, hdense, n)
    # the dense path of the same scorers agrees too
    d_ids, d_sc = bs.score(big_lib, query)
    np.testing.assert_allclose(d_sc, dense, rtol=1e-4, atol=1e-6)
    # file level: best segment per file, and a glob that forces the search to widen
    res = big_lib.search(query, scorer=bs, k=5)
    by_file = {}
    for sid, s in zip(ids, dense, strict=True):
        (fid, *_), = [big_lib.db.segment_rows([int(sid)])[int(sid)]]
        by_file[fid] = max(by_file.get(fid, -np.inf), s)
    np.testing.assert_allclose([r.score for r in res], sorted(by_file.values(), reverse=True), rtol=1e-4)
    worst = min(by_file, key=by_file.get)
    only = big_lib.search(query, scorer=hs, k=1, glob=big_lib.file(worst).path)
    assert [r.file_id for r in only] == [worst]


def test_library_scorer_names_and_fast_path_is_used(big_lib, monkeypatch):
    from atae.library import scorers

    assert scorers.canonical("model") == "adapter"
    assert big_lib.scorers()["available"] == ["adapter", "bridge", "hybrid"]
    a = big_lib.search("high", scorer="adapter", k=3)
    assert [r.path for r in a] == [r.path for r in big_lib.search("high", scorer="model", k=3)]
    bs = scorers.BridgeScorer(text_tower=HashTower())
    bs.top(big_lib, "whispering", 5)  # its mass sits on labels the band tags use (0-15)
    _, index = bs._index(big_lib)
    assert index.last_rescored < index.n_clips  # the exact top-k did not rescore every segment
