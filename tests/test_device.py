"""--device: what auto picks, clear errors for a device that is not there, and the CPU path end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atae.cli import main
from atae.device import default_batch, gpus_per_worker, resolve_device
from atae.errors import AtaeError


def test_auto_cpu_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu", "cpu:0:1"):
        with pytest.raises(AtaeError, match="unknown device"):
            resolve_device(bad)
    assert default_batch(torch.device("cpu"), 16, 64) == 16
    assert default_batch(torch.device("cuda", 0), 16, 64) == 64
    # Ray tower actors ask for a card only when the towers run on CUDA
    assert [gpus_per_worker(d) for d in ("cpu", torch.device("cpu"), "cuda", "cuda:1")] == [0, 0, 1, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(AtaeError, match="no CUDA GPU") as exc:
        resolve_device(name)
    assert "--device cpu" in exc.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", [
    ["extract", "--csv", "x.csv", "--audio-dir", ".", "--out", "f"],
    ["train", "--recipe", "atae", "--train-csv", "x.csv", "--train-audio", ".", "--val-csv", "x.csv",
     "--val-audio", ".", "--out", "r"],
    ["evaluate", "--scorer", "bridge", "--audio-encoder", "efficientat-mn04", "--csv", "x.csv",
     "--audio-dir", ".", "--json", "o.json"],
])
def test_every_command_refuses_cuda_on_a_cpu_machine(tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("file_name,caption_1\na.wav,a dog\n")
    r = CliRunner().invoke(main, command + ["--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output and "Traceback" not in r.output


def test_training_on_an_explicit_cpu_device_equals_the_default(tmp_path):
    from atae.train import run_recipe
    from train_fakes import make_world

    world, atab, ttab, _ = make_world(0, splits=(("train", 16), ("val", 8)))
    small = {"hidden": 16, "out_dim": 8, "batch_size": 8, "max_epochs": 2, "seed": 3}
    a = run_recipe("atae", world["train"], world["val"], None, atab, ttab, tmp_path / "a", **small)
    b = run_recipe("atae", world["train"], world["val"], None, atab, ttab, tmp_path / "b", device="cpu",
                   **small)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    seqs = [np.asarray(ttab.get(k)) for k in list(ttab.keys)[:4]]
    np.testing.assert_array_equal(a.model.encode_text(seqs), b.model.encode_text(seqs))
