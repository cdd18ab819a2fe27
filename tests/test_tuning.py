"""Tuning (temperature and hybrid weight on validation data, stored in the model directory), `atae tune`,
and the library's bridge / hybrid search checked against brute-force computations written out here."""

from __future__ import annotations

import csv
import json
import math
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atae import bridge as br
from atae import tuning
from atae.cli import main
from atae.model import AlignedModel
from atae.scoring import CLOSENESS_ERROR, EXTRA_HYBRID_GATE, EXTRA_HYBRID_WEIGHT, Fusion
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


def _brute_force(ds, atab, ttab, temperatures=br.TEMPERATURE_GRID):
    """(best temperature, best weight) by plain grid loops; adapter = cosine of mean rows (identity MLP)."""
    cands = [c.key for c in ds.clips]
    texts, rel, tk = [], [], []
    for j, c in enumerate(ds.clips):
        for i, cap in enumerate(c.captions):
            texts.append(cap)
            rel.append(j)
            tk.append(f"{c.key}#{i}")
    labels = _label_matrix()
    tags = np.sqrt(np.stack([atab.tags(k).mean(0) for k in cands]).astype(np.float64))
    best_t, best_m = None, -1.0
    for t in temperatures:
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
    for w in tuning.WEIGHT_GRID:
        m = _map10(w * _z(a) + (1 - w) * _z(b), rel)
        curve.append(m)
        if m > best_wm + 1e-12:
            best_w, best_wm = w, m
    return best_t, best_w, curve


def zscore_by_hand(row: list[float]) -> list[float]:
    n = len(row)
    mu = sum(row) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in row) / n)
    return [0.0 if sd == 0 else (x - mu) / sd for x in row]


def ap_by_hand(row, relevant, k=10):
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
    hits, total = 0, 0.0
    for rank, c in enumerate(order, start=1):
        if c in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def test_mean_ap_matches_hand_loop():
    rng = np.random.default_rng(5)
    s = rng.random((7, 30))
    rel = [[0], [3, 4, 5], [29], list(range(12)), [7, 8], [1], [2, 20]]
    expected = sum(ap_by_hand(list(s[q]), set(rel[q])) for q in range(7)) / 7
    assert tuning.mean_ap_at_k(s, rel) == pytest.approx(expected, abs=1e-12)
    # single relevant clip: 1/rank (DCASE 2022)
    row = np.array([[0.5, 0.9, 0.1, 0.7]])
    assert tuning.mean_ap_at_k(row, [2]) == pytest.approx(1 / 4)
    assert tuning.mean_ap_at_k(row, [2], k=3) == 0.0


def _problem(seed=11, n_clips=40, n_q=12):
    rng = np.random.default_rng(seed)
    rel = [int(x) for x in rng.integers(0, n_clips, n_q)]
    a = rng.standard_normal((n_q, n_clips))
    b = rng.standard_normal((n_q, n_clips))
    for q, c in enumerate(rel):  # make each scorer informative on a different half of the queries
        (a if q % 2 else b)[q, c] += 2.0
        (b if q % 2 else a)[q, c] += 0.7
    return a, b, rel


def test_tune_hybrid_weight_matches_brute_force():
    a, b, rel = _problem()
    grid = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
    best_w, best_m = None, -1.0
    for w in grid:
        mixed = [[w * x + (1 - w) * y for x, y in zip(zscore_by_hand(list(a[q])), zscore_by_hand(list(b[q])),
                                                       strict=True)] for q in range(len(rel))]
        m = sum(ap_by_hand(mixed[q], {rel[q]}) for q in range(len(rel))) / len(rel)
        if m > best_m + 1e-12:
            best_w, best_m = w, m
    assert tuning.tune_hybrid_weight(a, b, rel, grid=grid) == best_w
    curve = dict(tuning.hybrid_weight_curve(a, b, rel, grid=grid))
    assert curve[best_w] == pytest.approx(best_m, abs=1e-9)


def test_tune_on_dataset_matches_brute_force_grid_loops():
    from atae.tuning import tune_on_dataset

    ds, atab, ttab = _tag_world(0)
    model = _identity_model(atab.info, ttab.info)
    exp_t, exp_w, curve = _brute_force(ds, atab, ttab)
    assert max(curve) > min(curve)  # the weight matters on this data, so the choice is informative
    got = tune_on_dataset(ds, atab, HashTower(), model=model, text_table=ttab)
    assert got[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t
    assert got[EXTRA_HYBRID_WEIGHT] == exp_w
    only_t = tune_on_dataset(ds, atab, HashTower(), scorer="bridge")
    assert only_t[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t and EXTRA_HYBRID_WEIGHT not in only_t


def _closeness_by_hand(vec, reference) -> float:
    """Mean of the 5 largest cosines of a unit vector with the reference rows."""
    cos = sorted((sum(float(x) * float(y) for x, y in zip(vec, r, strict=True)) for r in reference),
                 reverse=True)
    return sum(cos[:5]) / min(5, len(cos))


def test_tune_after_training_stores_values_and_skips_towers_without_head(tmp_path):
    from atae.tuning import EXTRA_TUNED_ON, tune_after_training

    ds, atab, ttab = _tag_world(1)
    model = _identity_model(atab.info, ttab.info)
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((12, 16))
    model.caption_reference = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float32)
    model.save(tmp_path / "run")
    # after training the bridge keeps its default temperature: only the fusion is tuned
    exp_t, exp_w, _ = _brute_force(ds, atab, ttab, temperatures=(br.DEFAULT_TEMPERATURE,))
    # the gate: the least closeness of a validation caption (identity adapter: its unit mean token row)
    vecs = [ttab.get(f"{c.key}#{i}").mean(0) for c in ds.clips for i in range(len(c.captions))]
    exp_gate = min(_closeness_by_hand(v / np.linalg.norm(v), model.caption_reference) for v in vecs)
    out = tune_after_training(model, (ds, atab, ttab), tmp_path / "run", text_tower=HashTower())
    assert out[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t == br.DEFAULT_TEMPERATURE
    assert out[EXTRA_HYBRID_WEIGHT] == exp_w
    assert out[EXTRA_HYBRID_GATE] == pytest.approx(exp_gate, abs=CLOSENESS_ERROR)
    loaded = AlignedModel.load(tmp_path / "run")
    assert loaded.extras[br.EXTRA_BRIDGE_TEMPERATURE] == exp_t and Fusion.of(loaded).weight == exp_w
    assert Fusion.of(loaded).threshold == pytest.approx(exp_gate, abs=CLOSENESS_ERROR)
    assert loaded.extras[EXTRA_TUNED_ON]["n_queries"] == 2 * len(ds.clips)
    # no AudioSet tags: nothing tuned, nothing written
    plain = FakeTable(atab.info, {k: atab.get(k) for k in atab.keys})
    m2 = _identity_model(atab.info, ttab.info)
    assert "skipped" in tune_after_training(m2, (ds, plain, ttab), tmp_path / "r2", text_tower=HashTower())
    assert m2.extras == {} and not (tmp_path / "r2").exists()


def test_run_recipe_calls_the_tuning_hook(tmp_path, monkeypatch):
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
    assert cfg[EXTRA_HYBRID_WEIGHT] == rep[EXTRA_HYBRID_WEIGHT] in tuning.WEIGHT_GRID
    assert f"best temperature: {rep[br.EXTRA_BRIDGE_TEMPERATURE]:g}" in out
    # the identity adapter is perfect on "a {name} tone": the best hybrid weight gives mAP@10 = 1
    assert dict(map(tuple, rep["weight_curve"]))[rep[EXTRA_HYBRID_WEIGHT]] == 1.0
    code, out = _cli("tune", "--scorer", "bridge", "--audio-encoder", "bands", "--text-encoder", "words",
                     "--csv", c, "--audio-dir", audio, "--feats", tmp_path / "f",
                     "--json", tmp_path / "b.json", "--no-progress")
    assert code == 0, out
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["scorer"] == "bridge" and EXTRA_HYBRID_WEIGHT not in b
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
    lib.model.extras = {br.EXTRA_BRIDGE_TEMPERATURE: 0.02, EXTRA_HYBRID_WEIGHT: 0.3}
    yield lib
    lib.close()


def _brute(lib, text, temperature, weight=None, candidates=None):
    """Every tagged segment by plain loops: ids and bridge scores, or with ``weight`` the hybrid (z-scores
    over all tagged segments). ``candidates`` = (g, b): also the hybrid's candidate rule, the union of the
    adapter's top g and the bridge's top b, as a set of ids."""
    rows = lib.db.conn.execute("SELECT id, tags FROM segments WHERE tags IS NOT NULL ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows])
    tags = np.stack([np.frombuffer(r[1], np.float16) for r in rows]).astype(np.float64)
    dist = _dist(text, temperature, _label_matrix())
    b = np.array([sum(dist[lab] * np.sqrt(t[lab]) for lab in range(527)) for t in tags])
    if weight is None:
        return ids, b
    v = lib.index.vectors(lib.index.rows_of(ids)).astype(np.float64)
    q = np.zeros(16)
    for w in text.split():
        if w in FREQS:
            q[int(FREQS[w] // 250)] += 1
    a = v @ (q / np.linalg.norm(q))
    h = (weight * _z(a[None]) + (1 - weight) * _z(b[None]))[0]
    if candidates is None:
        return ids, h
    top = {int(ids[j]) for j in sorted(range(len(ids)), key=lambda j: (-a[j], ids[j]))[:candidates[0]]}
    top |= {int(ids[j]) for j in sorted(range(len(ids)), key=lambda j: (-b[j], ids[j]))[:candidates[1]]}
    return ids, h, top


def _assert_top(got_ids, got_scores, ids, scores, n):
    """The n best of ``scores`` up to float ties: the same sorted scores, each id scoring what it should."""
    exp = np.sort(scores)[::-1][:n]
    assert len(got_ids) == n and len(set(got_ids.tolist())) == n
    np.testing.assert_allclose(got_scores, exp, rtol=1e-4, atol=1e-6)
    pos = {int(i): j for j, i in enumerate(ids)}
    np.testing.assert_allclose(scores[[pos[int(i)] for i in got_ids]], got_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("query", ["high laughter", "low male speech", "mid whispering and shout"])
def test_library_bridge_and_hybrid_top_equal_brute_force(big_lib, query, monkeypatch):
    from atae.library.scorers import BridgeScorer, HybridScorer

    n_seg = big_lib.db.counts()["segments"]
    assert n_seg > 600
    bs, hs = BridgeScorer(text_tower=HashTower()), HybridScorer(text_tower=HashTower())
    ids, dense = _brute(big_lib, query, 0.02)
    hids, hdense = _brute(big_lib, query, 0.02, weight=0.3)
    for n in (5, 64):
        _assert_top(*bs.top(big_lib, query, n), ids, dense, n)
    # the hybrid's candidates: the adapter's top HYBRID_CANDIDATES and the bridge's top BRIDGE_CANDIDATES
    from atae.library import search

    monkeypatch.setattr(search, "HYBRID_CANDIDATES", 200)
    monkeypatch.setattr(search, "BRIDGE_CANDIDATES", 150)
    _, h, cand = _brute(big_lib, query, 0.02, weight=0.3, candidates=(200, 150))
    assert len(cand) < n_seg
    inside = np.array([int(i) in cand for i in hids])
    for n in (5, 64):
        _assert_top(*hs.top(big_lib, query, n), hids[inside], h[inside], n)
    # the dense path of the same scorers agrees with the loops
    np.testing.assert_allclose(bs.score(big_lib, query)[1], dense, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hs.score(big_lib, query)[1], hdense, rtol=1e-4, atol=1e-5)
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


def test_library_scorer_names(big_lib):
    from atae.library import scorers

    assert scorers.canonical("model") == "adapter"
    assert big_lib.scorers()["available"] == ["adapter", "bridge", "hybrid"]
    assert big_lib.scorers()["untagged"] == 0
    a = big_lib.search("high", scorer="adapter", k=3)
    assert [r.path for r in a] == [r.path for r in big_lib.search("high", scorer="model", k=3)]
