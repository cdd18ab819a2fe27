"""bench/evidence.py's refit step: retraining for fixed per-stage epoch counts (no validation) gives the
weights run_recipe gives without a validation set, and a two-stage recipe runs each stage its own count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from atae.train import run_recipe
from train_fakes import FakeDataset, make_world

torch.set_num_threads(1)
SMALL = {"hidden": 32, "out_dim": 16, "batch_size": 8}
BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("evidence_under_test", BENCH / "evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def _ctx(tmp_path):
    return SimpleNamespace(cache=tmp_path, args=SimpleNamespace(reuse_runs=False), timings={})


def test_refit_matches_run_recipe_without_validation(evidence, world, tmp_path):
    ds, atab, ttab, _ = world
    model, info = evidence.refit(_ctx(tmp_path), "t", "atae", SMALL, 2, [3], ds["train"], None, atab, ttab)
    ref = run_recipe("atae", ds["train"], None, None, atab, ttab, tmp_path / "ref", seed=2, max_epochs=3,
                     **SMALL)
    assert info["stages"][0]["epochs_run"] == 3
    want = ref.model.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_refit_runs_each_stage_its_own_epochs(evidence, world, tmp_path):
    ds, atab, ttab, _ = world
    noisy = (FakeDataset("noisy", ds["val"].clips), atab, ttab)
    _, info = evidence.refit(_ctx(tmp_path), "np", "atae-np-f", SMALL, 0, [2, 4], ds["train"], noisy, atab,
                             ttab)
    assert [(s["name"], s["epochs_run"]) for s in info["stages"]] == [("pretrain", 2), ("finetune", 4)]
    run = tmp_path / "runs" / "np-refit-e2-4-s0"
    assert sorted(p.parent.name for p in run.glob("stages/*/checkpoint.pt")) == ["1-pretrain", "2-finetune"]
    cfg = json.loads((run / "config.json").read_text())
    assert [s["epochs_run"] for s in cfg["training"]["stages"]] == [2, 4]
    assert cfg["training"]["stages"][1]["pairs"] == sum(len(c.captions) for c in ds["train"].clips)
