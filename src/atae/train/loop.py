"""The training loop: the seed's procedure, recipes of one or two stages, checkpoints and resume.

Procedure (seed paper section 3.3): Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-8); minibatches of 32
(audio, caption) pairs; after every epoch mAP@10 on the validation set (text->audio: every caption of the
validation clips is a query over the validation clips); stop after ``patience`` (10) epochs without a
strictly better score; restore the weights of the best epoch.

Definitions chosen here (the paper leaves them open):

* An epoch is one pass over every training pair in a fresh random order (sampling without replacement),
  cut into consecutive batches of ``batch_size``; the last batch may be smaller. The order of epoch e is
  drawn from a generator seeded with (seed, stage, e), so a resumed run sees exactly the batches the
  uninterrupted run would have seen.
* A stage of a recipe trains on the union of its data sources (``clean`` = the captioned training set,
  ``noisy`` = noisy pairs such as FSD50K tag sentences). Stage 2 starts from stage 1's best weights with a
  fresh optimiser: every stage uses the same procedure.

Speed: the training features are read from the feature store once per stage into packed tensors (all
real rows back to back plus offsets, no padding) and every batch is a gather from them, so an epoch is
pure matrix work. The adapter applies its second layer after the masked mean (see ``atae.model``).

Files in the run folder: ``config.json`` + ``adapters.safetensors`` (the final model, what later commands
load), ``log.jsonl`` (one line per epoch of every stage), ``learning_curve.png``, and
``stages/<n>-<name>/checkpoint.pt`` (written atomically after every epoch; model, optimiser, loss,
epoch, best state, RNG states).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from atae.errors import ModelError
from atae.io import atomic_path
from atae.model import AlignedModel
from atae.train.data import TrainData, ValData
from atae.train.recipe import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class StageResult:
    name: str
    best_score: float
    best_epoch: int
    epochs_run: int
    n_pairs: int
    history: list[dict]
    stopped: str  # "patience" | "max_epochs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _epoch_order(n: int, seed: int, stage_idx: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + stage_idx * 10_007 + epoch) % (2 ** 63))
    return torch.randperm(n, generator=g)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def _save_checkpoint(path: Path, ckpt: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ModelError(f"checkpoint is unreadable ({type(e).__name__}: {e})", path=path,
                         fix="delete this stage folder to restart the stage, or pass restart") from e


def _adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the fused (single-kernel) update where torch supports it: same algorithm, about a
    fifth of a training step saved on CPU."""
    try:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def train_stage(model: AlignedModel, loss_fn: torch.nn.Module, train: TrainData, val: ValData | None,
                cfg: TrainConfig, stage_dir: str | Path, *, stage_idx: int = 0, stage_name: str = "train",
                resume: bool = True, progress: bool = False,
                on_epoch: Callable[[dict], None] | None = None,
                on_history: Callable[[list[dict]], None] | None = None) -> StageResult:
    """Train ``model`` (and the loss's parameters, if any) in place; on return it holds the best weights.

    ``val=None``: no validation, exactly ``cfg.max_epochs`` epochs and the last weights are kept (a refit
    on train + validation data for an epoch count chosen earlier; the log's val_mAP@10 is NaN).

    ``on_epoch(record)`` runs after each epoch's checkpoint is on disk (an exception there interrupts
    training exactly like a crash would; the run resumes from that checkpoint). Batches are gathered on
    the CPU and moved to the model's device.
    """
    device = next(model.parameters()).device
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = stage_dir / CHECKPOINT_NAME
    identity = {"fingerprint": train.fingerprint, "val": None if val is None else val.fingerprint,
                "stage": stage_name, "config": asdict(cfg)}
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = _adam(params, cfg)
    st = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [],
          "best_model": None, "best_loss": None, "finished": False, "stopped": ""}
    if ckpt_path.exists():
        if not resume:
            raise ModelError("this stage already has a checkpoint", path=ckpt_path,
                             fix="resume it, or choose another output folder / restart")
        ck = _load_checkpoint(ckpt_path)
        if ck.get("identity") != _jsonable(identity):
            raise ModelError("the checkpoint belongs to another run (different data, towers or settings)",
                             path=ckpt_path, fix="use another --out folder, or restart to discard it")
        model.load_state_dict(ck["model"])
        loss_fn.load_state_dict(ck["loss"])
        opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        st = ck["state"]
    n = len(train)
    bar = None
    if progress and not st["finished"]:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_epochs, initial=st["epoch"], desc=f"train {stage_name}", unit="epoch",
                   disable=None)
    try:
        while not st["finished"] and st["epoch"] < cfg.max_epochs:
            epoch = st["epoch"] + 1
            t0 = time.perf_counter()
            model.train()
            order = _epoch_order(n, cfg.seed, stage_idx, epoch)
            total, steps = 0.0, 0
            for b in range(0, n, cfg.batch_size):
                idx = order[b:b + cfg.batch_size]
                ea = model.audio_adapter.forward_packed(*train.audio.gather(train.a_idx[idx]))
                et = model.text_adapter.forward_packed(*train.text.gather(train.t_idx[idx]))
                loss = loss_fn(ea, et, train.labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            model.eval()
            score = val.map_at_10(model) if val is not None else math.nan
            if not math.isfinite(total):
                raise ModelError(f"training diverged (loss {total}) in epoch {epoch} of stage {stage_name}",
                                 fix="lower the learning rate in the recipe")
            improved = val is None or score > st["best_score"]
            if improved:
                st["best_score"], st["best_epoch"], st["bad_epochs"] = score, epoch, 0
                st["best_model"] = copy.deepcopy(model.state_dict())
                st["best_loss"] = copy.deepcopy(loss_fn.state_dict())
            else:
                st["bad_epochs"] += 1
            rec = {"stage": stage_name, "epoch": epoch, "train_loss": total / max(steps, 1),
                   "val_mAP@10": score, "best": improved, "seconds": round(time.perf_counter() - t0, 4)}
            if hasattr(loss_fn, "temperature"):
                rec["temperature"] = loss_fn.temperature
            st["history"].append(rec)
            st["epoch"] = epoch
            if st["bad_epochs"] >= cfg.patience:
                st["stopped"] = "patience"
            elif epoch >= cfg.max_epochs:
                st["stopped"] = "max_epochs"
            if st["stopped"]:
                st["finished"] = True
                model.load_state_dict(st["best_model"])
                loss_fn.load_state_dict(st["best_loss"])
            _save_checkpoint(ckpt_path, {"identity": _jsonable(identity), "model": model.state_dict(),
                                         "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
                                         "rng": _rng_state(), "state": st})
            if on_history is not None:
                on_history(st["history"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{score:.4f}",
                                best=f"{st['best_score']:.4f}")
            if on_epoch is not None:
                on_epoch(rec)
    finally:
        if bar is not None:
            bar.close()
    if st["finished"]:
        model.load_state_dict(st["best_model"])
        loss_fn.load_state_dict(st["best_loss"])
    model.eval()
    return StageResult(stage_name, st["best_score"], st["best_epoch"], st["epoch"], n, st["history"],
                       st["stopped"])


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def plot_learning_curve(history: list[dict], path: str | Path) -> Path:
    """Train loss and validation mAP@10 per epoch (stages one after the other), PNG via matplotlib Agg."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(111)
    ax2 = ax.twinx()
    x = np.arange(1, len(history) + 1)
    ax.plot(x, [r["train_loss"] for r in history], color="tab:blue", label="train loss")
    ax2.plot(x, [r["val_mAP@10"] for r in history], color="tab:orange", label="val mAP@10")
    stages = [r["stage"] for r in history]
    for j in range(1, len(stages)):
        if stages[j] != stages[j - 1]:
            ax.axvline(j + 0.5, color="grey", ls="--", lw=0.8)
    best = [j for j, r in enumerate(history) if r.get("best")]
    if best:
        ax2.scatter(x[best], [history[j]["val_mAP@10"] for j in best], color="tab:orange", s=12)
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2.set_ylabel("val mAP@10", color="tab:orange")
    ax.set_title(" -> ".join(dict.fromkeys(stages)) or "training")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
