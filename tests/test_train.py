"""Training loop on a small synthetic world: learning, determinism, resume, early stopping, recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atae.errors import DataError, ModelError
from atae.model import AlignedModel
from atae.train import (
    PackedSeqs,
    TrainData,
    load_recipe,
    recipe_names,
    run_recipe,
)
from train_fakes import AUDIO_INFO, TEXT_INFO, FakeClip, FakeDataset, FakeTable, make_world

torch.set_num_threads(1)
SMALL = {"hidden": 32, "out_dim": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def _val_map_by_hand(model, ds, atab, ttab):
    """mAP@10 of val captions over val clips, ranked with numpy argsort (independent of atae.metrics)."""
    with torch.no_grad():
        za, ma = atab.batch([c.key for c in ds.clips])
        a = model.embed_audio(za, ma, normalize=True).numpy()
        tk = [(f"{c.key}#{i}", j) for j, c in enumerate(ds.clips) for i in range(len(c.captions))]
        zt, mt = ttab.batch([k for k, _ in tk])
        t = model.embed_text(zt, mt, normalize=True).numpy()
    s = t @ a.T
    total = 0.0
    for q, (_, j) in enumerate(tk):
        order = list(np.argsort(-s[q], kind="stable"))
        r = order.index(j) + 1
        total += 1.0 / r if r <= 10 else 0.0
    return total / len(tk)


def test_packed_gather_matches_table_rows(world):
    ds, atab, ttab, _ = world
    keys = [f"{c.key}#{i}" for c in ds["train"].clips[:5] for i in range(3)]
    p = PackedSeqs.from_table(ttab, keys)
    rows, seg, n, counts = p.gather(torch.tensor([4, 0, 7]))
    want = np.concatenate([ttab.get(keys[i]) for i in (4, 0, 7)])
    np.testing.assert_array_equal(rows.numpy(), want)
    assert n == 3 and counts.tolist() == [len(ttab.get(keys[i])) for i in (4, 0, 7)]
    assert seg.tolist() == sum(([j] * c for j, c in enumerate(counts.tolist())), [])


def test_train_data_labels_and_skips(world):
    ds, atab, ttab, _ = world
    clips = ds["train"].clips[:3] + [FakeClip("ghost.wav", None, ["no features"])]
    data = TrainData.build([(FakeDataset("d", clips), atab, ttab)])
    assert len(data) == 9
    assert data.skipped == ["ghost.wav: no audio features (extraction failed?), clip left out"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # two sources: labels of the second continue after the first's clips, audio items too
    two = TrainData.build([(FakeDataset("a", ds["train"].clips[:2]), atab, ttab),
                           (FakeDataset("b", ds["val"].clips[:2]), atab, ttab)])
    assert two.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert two.a_idx.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 and len(two.audio) == 4


def test_atae_recipe_learns_and_writes_run_folder(world, tmp_path):
    ds, atab, ttab, _ = world
    res = run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=1,
                     max_epochs=6, **SMALL)
    hist = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
    assert {"train_loss", "val_mAP@10", "seconds", "stage"} <= set(hist[0])
    best = max(hist, key=lambda h: h["val_mAP@10"])
    assert res.stages[0].best_epoch == best["epoch"]
    # the saved model holds the best epoch's weights: its val mAP@10 recomputed independently
    model = AlignedModel.load(tmp_path / "run")
    assert _val_map_by_hand(model, ds["val"], atab, ttab) == pytest.approx(best["val_mAP@10"], abs=1e-9)
    # 8 concepts over 16 val clips: chance mAP@10 is about 0.2; a learnt alignment is far above
    assert best["val_mAP@10"] > 0.5
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.train_summary["stages"][0]["best_epoch"] == best["epoch"]
    # the hybrid's novelty gate keeps the training captions: one unit text embedding per distinct caption
    texts = {}
    for c in ds["train"].clips:
        for i in range(len(c.captions)):
            seq = ttab.get(f"{c.key}#{i}")
            texts[seq.tobytes()] = seq
    want = model.encode_text(list(texts.values()))
    ref = model.caption_reference
    assert ref is not None and ref.shape == (len(texts), model.out_dim)
    got = sorted(map(tuple, np.round(ref.astype(np.float32), 2)))
    assert got == sorted(map(tuple, np.round(want.astype(np.float16).astype(np.float32), 2)))


def test_training_is_deterministic(world, tmp_path):
    ds, atab, ttab, _ = world
    runs = [run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / f"r{i}", seed=3,
                       max_epochs=3, **SMALL).model for i in range(2)]
    for (k, v), (_, w) in zip(runs[0].state_dict().items(), runs[1].state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    other = run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "r2", seed=4,
                       max_epochs=3, **SMALL).model
    assert not torch.equal(other.text_adapter.fc1.weight, runs[0].text_adapter.fc1.weight)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("recipe,stop_after", [("atae", 2), ("atae-np-f", 4)])
def test_resume_gives_the_uninterrupted_result(world, tmp_path, recipe, stop_after):
    ds, atab, ttab, _ = world
    noisy = FakeDataset("noisy", ds["test"].clips)
    kw = dict(seed=5, max_epochs=4, patience=10, **SMALL)
    full = run_recipe(recipe, ds["train"], ds["val"], noisy, atab, ttab, tmp_path / "full", **kw)
    seen = []

    def crash(rec):
        seen.append(rec)
        if len(seen) == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        run_recipe(recipe, ds["train"], ds["val"], noisy, atab, ttab, tmp_path / "cut", on_epoch=crash, **kw)
    assert not (tmp_path / "cut" / "config.json").exists()
    resumed = run_recipe(recipe, ds["train"], ds["val"], noisy, atab, ttab, tmp_path / "cut", **kw)
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True)
    for (k, v), (_, w) in pairs:
        assert torch.equal(v, w), k
    log_full = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_cut = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in log_full]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in log_cut]
    if recipe == "atae-np-f":
        assert [r["stage"] for r in log_full] == ["pretrain"] * 4 + ["finetune"] * 4


def test_early_stopping_restores_best(world, tmp_path):
    ds, atab, ttab, _ = world
    # a learning rate so large that validation stops improving quickly
    res = run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=0,
                     max_epochs=50, patience=2, lr=0.5, **SMALL)
    st = res.stages[0]
    scores = [h["val_mAP@10"] for h in st.history]
    best_i = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum
    assert st.stopped == "patience" and st.epochs_run == best_i + 1 + 2 < 50
    assert st.best_epoch == best_i + 1
    assert _val_map_by_hand(res.model, ds["val"], atab, ttab) == pytest.approx(scores[best_i], abs=1e-9)


def test_infonce_recipe_trains(world, tmp_path):
    ds, atab, ttab, _ = world
    res = run_recipe("atae-infonce", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=1,
                     max_epochs=3, **SMALL)
    assert res.summary["loss"]["name"] == "infonce" and res.summary["loss"]["learnable"] is True
    assert "temperature" in res.stages[0].history[0]


def test_recipes_and_bad_settings(world, tmp_path):
    ds, atab, ttab, _ = world
    assert {"atae", "atae-et", "atae-ep-f", "atae-np-f"} <= set(recipe_names())
    assert [s.data for s in load_recipe("atae-ep-f").stages] == [["clean", "noisy"], ["clean"]]
    assert [s.data for s in load_recipe("atae-np-f").stages] == [["noisy"], ["clean"]]
    assert load_recipe("atae-et").stages[0].data == ["clean", "noisy"]
    r = load_recipe("atae")
    assert (r.train.lr, r.train.betas, r.train.eps, r.train.batch_size, r.train.patience) == (
        1e-3, (0.9, 0.999), 1e-8, 32, 10)
    with pytest.raises(DataError, match="unknown recipe"):
        load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[stages]]\ndata = ["clotho"]\n')
    with pytest.raises(DataError, match="stage 1"):
        load_recipe(bad)
    with pytest.raises(DataError, match="needs noisy pairs"):
        run_recipe("atae-np-f", ds["train"], ds["val"], None, atab, ttab, tmp_path / "x", **SMALL)
    empty_val = FakeDataset("v", [FakeClip("ghost.wav", None, ["x"])])
    with pytest.raises(DataError, match="no usable caption"):
        run_recipe("atae", ds["train"], empty_val, None, atab, ttab, tmp_path / "y", **SMALL)


def test_other_run_in_out_dir_is_not_overwritten(world, tmp_path):
    ds, atab, ttab, _ = world
    run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=1, max_epochs=1,
               **SMALL)
    ckpt = tmp_path / "run" / "stages" / "1-clean" / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(ModelError, match="another run"):
        run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=2, max_epochs=1,
                   **SMALL)
    assert ckpt.read_bytes() == before
    run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=2, max_epochs=1,
               restart=True, **SMALL)
    assert ckpt.read_bytes() != before
    ckpt.write_bytes(b"truncated")
    with pytest.raises(ModelError, match="unreadable"):
        run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "run", seed=2, max_epochs=1,
                   **SMALL)


def test_training_on_variable_length_audio_uses_masked_mean(tmp_path):
    # one clip's audio repeated: the mean of identical rows equals one row, so a model must embed
    # [x] and [x, x, x] identically (padding or a plain sum would not)
    x = np.random.default_rng(0).standard_normal((1, AUDIO_INFO.dim)).astype(np.float32)
    tab = FakeTable(AUDIO_INFO, {"a": x, "b": np.repeat(x, 3, 0)})
    p = PackedSeqs.from_table(tab, ["a", "b"])
    from atae.train import embed_packed

    m = AlignedModel(AUDIO_INFO, AUDIO_INFO, hidden=8, out_dim=4)
    e = embed_packed(m.audio_adapter, p)
    torch.testing.assert_close(e[0], e[1])


def test_streaming_from_tables_gives_the_preloaded_result(world, tmp_path, monkeypatch):
    """Over the preload budget, batches are read from the tables per step: same numbers."""
    from atae.train import TableSeqs

    ds, atab, ttab, _ = world
    kw = dict(seed=2, max_epochs=2, **SMALL)
    ram = run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "ram", **kw).model
    monkeypatch.setenv("ATAE_TRAIN_PRELOAD_GB", "0")
    data = TrainData.build([(ds["train"], atab, ttab)])
    assert isinstance(data.audio, TableSeqs) and isinstance(data.text, TableSeqs)
    rows, seg, n, counts = data.text.gather(torch.tensor([3, 1]))
    want = np.concatenate([ttab.get(data.text.items[i][1]) for i in (3, 1)])
    np.testing.assert_array_equal(rows.numpy(), want)
    streamed = run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "stream", **kw).model
    for (k, v), (_, w) in zip(ram.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_one_step_is_an_adam_step_with_the_seed_settings(world, tmp_path):
    """Adam's first update with bias correction is lr * g / (|g| + eps): every weight with a gradient
    moves by lr (1e-3) exactly, against its gradient."""
    import copy

    from atae.losses import SeedContrastiveLoss
    from atae.train import TrainConfig, ValData, train_stage

    ds, atab, ttab, _ = world
    data = TrainData.build([(FakeDataset("d", ds["train"].clips[:5]), atab, ttab)])
    val = ValData.build(ds["val"], atab, ttab)
    torch.manual_seed(0)
    model = AlignedModel(AUDIO_INFO, TEXT_INFO, hidden=16, out_dim=8)
    before = copy.deepcopy(model.state_dict())
    # the gradient of that single full batch, computed here through the padded (non-packed) path
    za, ma = atab.batch([ds["train"].clips[i // 3].key for i in range(15)])
    zt, mt = ttab.batch([f"{ds['train'].clips[i // 3].key}#{i % 3}" for i in range(15)])
    g_model = copy.deepcopy(model)
    SeedContrastiveLoss()(g_model.embed_audio(za, ma), g_model.embed_text(zt, mt),
                          torch.arange(15) // 3).backward()
    cfg = TrainConfig(batch_size=15, max_epochs=1, seed=0)
    train_stage(model, SeedContrastiveLoss(), data, val, cfg, tmp_path / "s")
    for (name, p), g in zip(model.named_parameters(), g_model.parameters(), strict=True):
        delta = p.detach() - before[name]
        has = g.grad.abs() > 1e-4  # eps (1e-8) is negligible against these
        torch.testing.assert_close(delta[has], -1e-3 * torch.sign(g.grad[has]), rtol=1e-3, atol=1e-6)
