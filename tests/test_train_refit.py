"""Training without a validation set (a refit for a fixed number of epochs, bench/evidence.py refit
protocol): exactly max_epochs epochs, and the LAST epoch's weights are kept."""

from __future__ import annotations

import math

import pytest
import torch

from atae.train import CHECKPOINT_NAME, run_recipe
from train_fakes import make_world

torch.set_num_threads(1)
SMALL = {"hidden": 32, "out_dim": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def test_no_validation_trains_fixed_epochs_and_keeps_last_weights(world, tmp_path):
    ds, atab, ttab, _ = world
    # reference: the same run WITH validation, 4 epochs; the stage checkpoint on disk after epoch 2 holds
    # the epoch-2 weights (training steps do not depend on validation, which draws no random numbers)
    snap = {}
    ckpt = tmp_path / "with-val" / "stages" / "1-clean" / CHECKPOINT_NAME

    def grab(rec):
        if rec["epoch"] == 2:
            snap.update(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])

    run_recipe("atae", ds["train"], ds["val"], None, atab, ttab, tmp_path / "with-val", seed=3,
               max_epochs=4, patience=10, lr=0.05, on_epoch=grab, **SMALL)
    res = run_recipe("atae", ds["train"], None, None, atab, ttab, tmp_path / "no-val", seed=3,
                     max_epochs=2, patience=10, lr=0.05, **SMALL)
    st = res.stages[0]
    assert st.epochs_run == 2 and st.best_epoch == 2 and st.stopped == "max_epochs"
    assert len(st.history) == 2 and all(math.isnan(h["val_mAP@10"]) for h in st.history)
    got = res.model.state_dict()
    assert snap and set(got) == set(snap)
    for k, v in snap.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert res.summary["tuning"] == {"skipped": "no validation set"}
    assert res.summary["val_fingerprint"] is None
    assert (tmp_path / "no-val" / "config.json").exists()


def test_no_validation_ignores_patience(world, tmp_path):
    ds, atab, ttab, _ = world
    # patience 1 stops a validated run after its first epoch without a strictly better score
    res = run_recipe("atae", ds["train"], None, None, atab, ttab, tmp_path / "run", seed=1, max_epochs=4,
                     patience=1, lr=0.5, **SMALL)
    assert res.stages[0].epochs_run == 4 and res.stages[0].best_epoch == 4


def test_stage_epochs_must_name_every_stage(world, tmp_path):
    from atae.errors import ModelError

    ds, atab, ttab, _ = world
    with pytest.raises(ModelError, match="1 epoch counts for the 2 stages"):
        run_recipe("atae-np-f", ds["train"], None, ds["val"], atab, ttab, tmp_path / "r", stage_epochs=[2],
                   hidden=32, out_dim=16, batch_size=8)
