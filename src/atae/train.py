"""Training the adapters: the seed's procedure, recipes of one or two stages, checkpoints and resume.

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
import hashlib
import json
import math
import os
import random
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from atae.errors import DataError, ModelError
from atae.features import caption_key
from atae.io import atomic_path, atomic_write_text
from atae.losses import make_loss
from atae.model import AlignedModel

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
CURVE_NAME = "learning_curve.png"
DATA_SOURCES = ("clean", "noisy")


# ------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    loss: str = "seed"
    loss_params: dict = field(default_factory=dict)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 32
    patience: int = 10
    max_epochs: int = 200
    seed: int = 0
    hidden: int = 512
    out_dim: int = 512

    def __post_init__(self):
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.batch_size < 2:
            raise DataError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.max_epochs < 1 or self.patience < 1:
            raise DataError("max_epochs and patience must be at least 1")


@dataclass
class Stage:
    name: str
    data: list[str]  # subset of DATA_SOURCES


@dataclass
class Recipe:
    name: str
    description: str
    stages: list[Stage]
    train: TrainConfig

    @property
    def needs_noisy(self) -> bool:
        return any("noisy" in s.data for s in self.stages)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "stages": [asdict(s) for s in self.stages], "train": asdict(self.train)}


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("atae.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | Path, **overrides) -> Recipe:
    """A packaged recipe by name (``atae``, ``atae-et``, ``atae-ep-f``, ``atae-np-f``, ...) or a TOML file.

    ``overrides`` replace [train] fields (e.g. ``seed=1, max_epochs=5, loss="infonce"``); None is ignored.
    """
    p = Path(str(name_or_path))
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise DataError("recipe file not found", path=p, fix=f"use a file or one of {recipe_names()}")
        text, where = p.read_text(encoding="utf-8"), p
    else:
        res = resources.files("atae.recipes") / f"{name_or_path}.toml"
        if not res.is_file():
            raise DataError(f"unknown recipe {name_or_path!r}",
                            fix=f"use one of {recipe_names()} or a .toml file")
        text, where = res.read_text(encoding="utf-8"), Path(str(res))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"recipe is not valid TOML ({e})", path=where) from e
    stages = raw.get("stages") or []
    if not stages or len(stages) > 2:
        raise DataError("a recipe needs one or two [[stages]]", path=where)
    out_stages = []
    for i, s in enumerate(stages):
        data = list(s.get("data") or [])
        if not data or any(d not in DATA_SOURCES for d in data):
            raise DataError(f"stage {i + 1}: data must be a non-empty list of {DATA_SOURCES}, got {data}",
                            path=where)
        out_stages.append(Stage(str(s.get("name") or f"stage{i + 1}"), data))
    tr = dict(raw.get("train") or {})
    loss = dict(raw.get("loss") or {})
    tr["loss"] = loss.pop("name", tr.get("loss", "seed"))
    tr["loss_params"] = loss
    _apply_overrides(tr, overrides)
    try:
        cfg = TrainConfig(**tr)
    except TypeError as e:
        raise DataError(f"bad [train] table: {e}", path=where,
                        fix=f"known fields: {sorted(TrainConfig.__dataclass_fields__)}") from e
    return Recipe(str(raw.get("name") or p.stem), str(raw.get("description", "")), out_stages, cfg)


# --------------------------------------------------------------------------------------------- data
@dataclass
class PairSet:
    """Training pairs (audio key, text key, clip label); labels are ints, equal for the same clip."""

    pairs: list[tuple[str, str, int]]
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, dataset, audio_table=None, text_table=None, label_offset: int = 0) -> PairSet:
        """Every (clip, caption i) of a CaptionDataset with text key ``caption_key(clip.key, i)``. With tables
        given, clips or captions whose features are missing (failed extraction) are skipped and listed."""
        pairs, skipped = [], []
        for ci, clip in enumerate(dataset.clips):
            if audio_table is not None and clip.key not in audio_table:
                skipped.append(f"{clip.key}: no audio features (extraction failed?), clip left out")
                continue
            for i in range(len(clip.captions)):
                tkey = caption_key(clip.key, i)
                if text_table is not None and tkey not in text_table:
                    skipped.append(f"{tkey}: no text features, caption left out")
                    continue
                pairs.append((clip.key, tkey, label_offset + ci))
        return cls(pairs, skipped)

    def __len__(self) -> int:
        return len(self.pairs)


def _offsets(items: Sequence[tuple[object, str]], lengths: Sequence[int]) -> np.ndarray:
    """(N + 1,) int64 start of each item's rows; an empty cached sequence means a broken feature store."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths == 0).any():
        bad = items[int(np.flatnonzero(lengths == 0)[0])][1]
        raise DataError(f"cached sequence {bad!r} is empty", fix="re-extract the features")
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])


@dataclass
class PackedSeqs:
    """Variable-length sequences stored back to back: rows ``data[offsets[i]:offsets[i+1]]`` are item i."""

    data: torch.Tensor  # (N_rows, F) float32
    offsets: torch.Tensor  # (N + 1,) int64

    @classmethod
    def from_table(cls, table, keys: Sequence[str]) -> PackedSeqs:
        return cls.from_items([(table, k) for k in keys], dim=getattr(getattr(table, "info", None), "dim", 0))

    @classmethod
    def from_items(cls, items: Sequence[tuple[object, str]], dim: int = 0) -> PackedSeqs:
        """Copy the rows of (table, key) items into one float32 block (allocated once)."""
        arrs = [t.get(k) for t, k in items]
        offsets = _offsets(items, [a.shape[0] for a in arrs])
        dim = arrs[0].shape[1] if arrs else int(dim)
        data = np.empty((int(offsets[-1]), dim), dtype=np.float32)
        for a, start in zip(arrs, offsets[:-1], strict=True):
            data[start:start + a.shape[0]] = a
        return cls(torch.from_numpy(data), torch.from_numpy(offsets))

    @classmethod
    def concat(cls, parts: Sequence[PackedSeqs]) -> PackedSeqs:
        if len(parts) == 1:
            return parts[0]
        data = torch.cat([p.data for p in parts])
        offs, base = [torch.zeros(1, dtype=torch.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(data, torch.cat(offs))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Rows of items ``idx`` -> (rows (N, F), segment id per row, number of items, rows per item)."""
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        counts = ends - starts
        n = len(idx)
        if bool((counts == 1).all()):  # whole-clip audio: one row each, a plain index
            return self.data[starts], torch.arange(n), n, counts
        seg = torch.repeat_interleave(torch.arange(n), counts)
        first = torch.cumsum(counts, 0) - counts
        rows = torch.arange(int(counts.sum())) - first[seg] + starts[seg]
        return self.data[rows], seg, n, counts


class TableSeqs:
    """Same interface as PackedSeqs, reading each batch's rows from the (memory-mapped) tables instead
    of RAM: used when a training set's features would not fit the preload budget (e.g. the full FSD50K
    noisy set with a 768-d text tower is over 10 GB). Same numbers, a little slower per step."""

    def __init__(self, items: Sequence[tuple[object, str]]):
        self.items = list(items)  # (table, key)
        self.offsets = torch.from_numpy(_offsets(self.items, [len(t.get(k)) for t, k in self.items]))

    def __len__(self) -> int:
        return len(self.items)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        arrs = [np.asarray(self.items[i][0].get(self.items[i][1]), dtype=np.float32) for i in idx.tolist()]
        counts = torch.tensor([a.shape[0] for a in arrs], dtype=torch.int64)
        n = len(arrs)
        seg = torch.repeat_interleave(torch.arange(n), counts)
        return torch.from_numpy(np.concatenate(arrs)), seg, n, counts


def preload_budget() -> int:
    """Bytes of training features loaded into RAM at most (env ATAE_TRAIN_PRELOAD_GB, default 4)."""
    return int(float(os.environ.get("ATAE_TRAIN_PRELOAD_GB", "4")) * 2 ** 30)


def _seqs(items: Sequence[tuple[object, str]], budget: int):
    """PackedSeqs (all rows in RAM) when they fit ``budget`` bytes, else TableSeqs (read per batch)."""
    nbytes = 0
    for t, k in items:
        a = t.get(k)
        nbytes += a.shape[0] * a.shape[1] * 4
        if nbytes > budget:
            return TableSeqs(items)
    return PackedSeqs.from_items(items)


def embed_packed(adapter, packed: PackedSeqs | TableSeqs, *, batch: int = 2048,
                 normalize: bool = True) -> torch.Tensor:
    """All items of a PackedSeqs through an adapter, in chunks, without gradients."""
    outs = []
    with torch.no_grad():
        for a in range(0, len(packed), batch):
            idx = torch.arange(a, min(a + batch, len(packed)))
            e = adapter.forward_packed(*packed.gather(idx))
            outs.append(torch.nn.functional.normalize(e, dim=-1) if normalize else e)
    return torch.cat(outs) if outs else torch.zeros(0, adapter.out_dim)


@dataclass
class TrainData:
    """One stage's training set as tensors: packed audio and text features and the pair index."""

    audio: PackedSeqs | TableSeqs
    text: PackedSeqs | TableSeqs
    a_idx: torch.Tensor  # (P,) item in ``audio`` of pair p
    t_idx: torch.Tensor  # (P,) item in ``text``
    labels: torch.Tensor  # (P,) clip label (distinct across sources)
    fingerprint: str
    skipped: list[str]

    @classmethod
    def build(cls, sources: Sequence[tuple[object, object, object]]) -> TrainData:
        """``sources``: (CaptionDataset, audio_table, text_table) triples, e.g. clean and noisy."""
        audio_items, text_items, a_idx, t_idx, labels, skipped = [], [], [], [], [], []
        h = hashlib.sha256()
        n_audio = n_text = label_base = 0
        for dataset, atab, ttab in sources:
            ps = PairSet.from_dataset(dataset, atab, ttab, label_offset=label_base)
            skipped += ps.skipped
            akeys = list(dict.fromkeys(a for a, _, _ in ps.pairs))
            apos = {k: i for i, k in enumerate(akeys)}
            tkeys = [t for _, t, _ in ps.pairs]
            audio_items += [(atab, k) for k in akeys]
            text_items += [(ttab, k) for k in tkeys]
            for j, (a, t, lab) in enumerate(ps.pairs):
                a_idx.append(n_audio + apos[a])
                t_idx.append(n_text + j)
                labels.append(lab)
                h.update(f"{a}\x00{t}\x00{lab}\n".encode())
            h.update(f"|{_info_key(atab)}|{_info_key(ttab)}|".encode())
            n_audio += len(akeys)
            n_text += len(tkeys)
            label_base += len(dataset.clips)
        if not a_idx:
            raise DataError("no training pairs: every clip or caption lacks cached features",
                            fix="check the extraction report (unreadable audio, empty captions)")
        budget = preload_budget()
        audio = _seqs(audio_items, budget)
        text = _seqs(text_items, budget - (audio.data.numel() * 4 if isinstance(audio, PackedSeqs) else 0))
        return cls(audio, text,
                   torch.tensor(a_idx), torch.tensor(t_idx), torch.tensor(labels), h.hexdigest(), skipped)

    def __len__(self) -> int:
        return len(self.a_idx)


@dataclass
class ValData:
    """Validation as the seed does it: every caption of the val clips queries all val clips."""

    audio: PackedSeqs
    text: PackedSeqs
    relevant: np.ndarray  # (Q,) column of each caption's clip
    fingerprint: str

    @classmethod
    def build(cls, dataset, audio_table, text_table) -> ValData:
        from atae.evaluate import dataset_queries

        keys, _, tkeys, rel, _ = dataset_queries(dataset, audio_table, text_table)
        if not tkeys:
            raise DataError(f"validation set {getattr(dataset, 'name', '')!r} has no usable caption",
                            fix="check --val-csv/--val-audio and the extraction report")
        h = hashlib.sha256(("\n".join(keys + tkeys)).encode()).hexdigest()
        return cls(PackedSeqs.from_table(audio_table, keys),
                   PackedSeqs.from_table(text_table, tkeys), np.asarray(rel), h)

    def map_at_10(self, model: AlignedModel) -> float:
        from atae.metrics import map_at_k, ranks_single

        a = embed_packed(model.audio_adapter, self.audio)
        t = embed_packed(model.text_adapter, self.text)
        scores = (t @ a.T).numpy()
        return float(map_at_k(ranks_single(scores, self.relevant), 10).mean())


def _info_key(table) -> str:
    info = getattr(table, "info", None)
    return info.key() if info is not None and hasattr(info, "key") else "?"


# ----------------------------------------------------------------------------------------- training
@dataclass
class StageResult:
    name: str
    best_score: float
    best_epoch: int
    epochs_run: int
    n_pairs: int
    history: list[dict]
    stopped: str  # "patience" | "max_epochs"


def _seed_everything(seed: int) -> None:
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
    training exactly like a crash would; the run resumes from that checkpoint).
    """
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
                loss = loss_fn(ea, et, train.labels[idx])
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


# ------------------------------------------------------------------------------------------ recipes
@dataclass
class RunResult:
    model: AlignedModel
    out_dir: Path
    stages: list[StageResult]
    summary: dict


def _as_source(x, audio_table, text_table):
    """A CaptionDataset (uses the default tables) or a (dataset, audio_table, text_table) triple."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return x
    return (x, audio_table, text_table)


def run_recipe(recipe: Recipe | str, clean_train, clean_val, noisy, audio_table, text_table, out_dir, *,
               resume: bool = True, restart: bool = False, progress: bool = False,
               on_epoch: Callable[[dict], None] | None = None, text_tower=None,
               stage_epochs: Sequence[int] | None = None, **overrides) -> RunResult:
    """Run every stage of a recipe and save the final model (best weights of the last stage) in
    ``out_dir``. ``clean_train``/``clean_val``/``noisy`` are CaptionDatasets (or (dataset, audio_table,
    text_table) triples when a source lives in other tables); ``noisy`` may be None for the ``atae`` recipe.

    ``clean_val=None`` trains every stage for exactly ``max_epochs`` epochs and keeps the last weights;
    ``stage_epochs`` gives each stage its own ``max_epochs`` (a refit for counts chosen earlier).
    Running the same call again resumes from the last checkpoint (``resume``); ``restart=True`` discards
    an earlier run in ``out_dir`` first. ``overrides`` replace TrainConfig fields (seed, max_epochs, loss).
    With a tagging audio tower the bridge temperature and hybrid weight are then tuned on ``clean_val``
    and stored in the model's extras (``atae.tuning``; ``text_tower``: the tower the text table came from).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        recipe = load_recipe_from(recipe, **overrides)
    cfg = recipe.train
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError("output path exists and is not a folder", path=out, fix="choose another --out")
    if restart:
        for name in ("stages", "config.json", "adapters.safetensors", LOG_NAME, CURVE_NAME):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    sources = {"clean": _as_source(clean_train, audio_table, text_table),
               "noisy": _as_source(noisy, audio_table, text_table)}
    if recipe.needs_noisy and sources["noisy"] is None:
        raise DataError(f"recipe {recipe.name!r} needs noisy pairs",
                        fix="pass --noisy-json J --noisy-audio D (FSD50K), or use the `atae` recipe")
    val_src = _as_source(clean_val, audio_table, text_table)
    val = ValData.build(*val_src) if val_src is not None else None
    audio_info, text_info = audio_table.info, text_table.info

    _seed_everything(cfg.seed)
    model = AlignedModel(audio_info, text_info, hidden=cfg.hidden, out_dim=cfg.out_dim)
    loss_fn = make_loss(cfg.loss, **cfg.loss_params)
    histories: dict[int, list[dict]] = {}

    def write_log(i: int, hist: list[dict]) -> None:
        histories[i] = hist
        lines = [json.dumps(r) for k in sorted(histories) for r in histories[k]]
        atomic_write_text(out / LOG_NAME, "\n".join(lines) + ("\n" if lines else ""))

    if stage_epochs is not None and len(stage_epochs) != len(recipe.stages):
        raise ModelError(f"{len(stage_epochs)} epoch counts for the {len(recipe.stages)} stages of "
                         f"recipe {recipe.name!r}", fix="give one count per stage")
    results = []
    for i, stage in enumerate(recipe.stages):
        data = TrainData.build([sources[s] for s in stage.data])
        stage_cfg = cfg if stage_epochs is None else replace(cfg, max_epochs=int(stage_epochs[i]))
        res = train_stage(model, loss_fn, data, val, stage_cfg, out / "stages" / f"{i + 1}-{stage.name}",
                          stage_idx=i, stage_name=stage.name, resume=resume or restart, progress=progress,
                          on_epoch=on_epoch, on_history=lambda h, i=i: write_log(i, h))
        write_log(i, res.history)
        results.append(res)
    summary = {
        "recipe": recipe.to_dict(),
        "loss": (loss_fn.extra_state_summary() if hasattr(loss_fn, "extra_state_summary")
                 else {"name": cfg.loss}),
        "stages": [{"name": r.name, "data": s.data, "pairs": r.n_pairs, "best_epoch": r.best_epoch,
                    "epochs_run": r.epochs_run, "best_val_mAP@10": r.best_score, "stopped": r.stopped}
                   for r, s in zip(results, recipe.stages, strict=True)],
        "val_fingerprint": None if val is None else val.fingerprint,
    }
    model.train_summary = summary
    model.save(out)
    from atae.tuning import tune_after_training

    summary["tuning"] = ({"skipped": "no validation set"} if val_src is None
                         else tune_after_training(model, val_src, out, text_tower=text_tower))
    try:
        plot_learning_curve([r for k in sorted(histories) for r in histories[k]], out / CURVE_NAME)
    except Exception as e:  # noqa: BLE001 - a missing plot must never lose a trained model
        summary["plot_error"] = str(e)
    return RunResult(model, out, results, summary)


def _apply_overrides(tr: dict, overrides: dict) -> None:
    """Replace [train] fields in place (None is ignored); another loss drops the recipe's loss_params,
    which belong to the recipe's own loss."""
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "loss" and v != tr["loss"]:
            tr["loss_params"] = {}
        tr[k] = v


def load_recipe_from(recipe: Recipe, **overrides) -> Recipe:
    tr = asdict(recipe.train)
    _apply_overrides(tr, overrides)
    return Recipe(recipe.name, recipe.description, recipe.stages, TrainConfig(**tr))


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


# ------------------------------------------------------------------------------ command plumbing
def train_from_files(recipe: str | Path, *, train_csv, train_audio, val_csv, val_audio, out,
                     noisy_json=None, noisy_audio=None, audio_encoder: str | None = None, audio_weights=None,
                     text_encoder: str | None = None, text_weights=None, feats=None, seed: int | None = None,
                     max_epochs: int | None = None, loss: str | None = None, restart: bool = False,
                     progress: bool = True, echo: Callable[[str], None] = print) -> RunResult:
    """``atae train``: read the datasets, build the towers, extract (cached, resumable) and run a recipe.

    Noisy pairs: ``noisy_json`` + ``noisy_audio`` read FSD50K's clip-info JSON (half of the clips, the
    seed's rule); ``noisy_audio`` alone self-tags every audio file of the folder with the audio tower's
    AudioSet head (issue 5; needs a tower with tags). Features go to ``feats`` (default ``out/features``).
    """
    from atae.data import read_caption_csv, read_fsd50k_noisy
    from atae.features import ensure_dataset_features
    from atae.towers.registry import default_towers, get_audio_tower, get_text_tower

    rec = load_recipe(recipe, seed=seed, max_epochs=max_epochs, loss=loss)
    if rec.needs_noisy and noisy_audio is None:
        raise DataError(f"recipe {rec.name!r} needs noisy pairs",
                        fix="pass --noisy-json J --noisy-audio D (FSD50K), or --noisy-audio D alone "
                            "(self-tagged), or use --recipe atae")
    if noisy_json is not None and noisy_audio is None:
        raise DataError("--noisy-json needs --noisy-audio (the folder of <clip_id>.wav)", path=noisy_json)
    out = Path(out)
    feats = Path(feats) if feats is not None else out / "features"
    clean = read_caption_csv(train_csv, train_audio)
    val = read_caption_csv(val_csv, val_audio)
    for ds in (clean, val):
        for p in ds.problems:
            echo(f"warning: {p}")
    if audio_encoder is None or text_encoder is None:
        da, dt = default_towers()
        audio_encoder, text_encoder = audio_encoder or da, text_encoder or dt
    audio_tower = get_audio_tower(audio_encoder, audio_weights)
    text_tower = get_text_tower(text_encoder, text_weights)
    echo(f"towers: audio {audio_tower.info.name} ({audio_tower.info.key()}), "
         f"text {text_tower.info.name} ({text_tower.info.key()})")
    atab = ttab = None
    for ds in (clean, val):
        atab, ttab, report = ensure_dataset_features(ds, audio_tower, text_tower, feats, progress=progress)
        echo(f"features {ds.name}: {report.summary()}")
    noisy = None
    if rec.needs_noisy:
        if noisy_json is not None:
            noisy = read_fsd50k_noisy(noisy_json, noisy_audio)
            for p in noisy.problems[:20]:
                echo(f"warning: {p}")
            atab, ttab, report = ensure_dataset_features(noisy, audio_tower, text_tower, feats,
                                                         progress=progress)
            echo(f"features {noisy.name}: {report.summary()}")
        else:
            noisy = _self_tagged(noisy_audio, audio_tower, text_tower, feats, progress, echo)
            for p in noisy[0].problems[:20]:
                echo(f"warning: {p}")
            from atae.features import FeatureStore

            # the clean sets' tables, re-opened so they include everything extracted so far
            store = FeatureStore(feats)
            atab, ttab = store.audio_table(audio_tower.info), store.text_table(text_tower.info)
    elif noisy_audio is not None:
        echo(f"note: recipe {rec.name!r} has no noisy stage; --noisy-* ignored")
    result = run_recipe(rec, clean, val, noisy, atab, ttab, out, restart=restart, progress=progress,
                        text_tower=text_tower)
    for st in result.stages:
        echo(f"stage {st.name}: {st.n_pairs} pairs, {st.epochs_run} epochs, best val mAP@10 "
             f"{st.best_score:.4f} at epoch {st.best_epoch} ({st.stopped})")
    tuning = result.summary.get("tuning") or {}
    if "skipped" not in tuning:
        echo("tuned on validation: " + ", ".join(f"{k} {v:g}" for k, v in tuning.items()))
    echo(f"model saved to {out}")
    return result


def _self_tagged(noisy_audio, audio_tower, text_tower, feats, progress, echo):
    """Noisy pairs from an uncaptioned folder: extract its audio once, then caption each clip with its
    top AudioSet tags read from the cached features (the tower does not run twice).

    Returns a (dataset, audio_table, text_table) source whose pseudo-caption features live in their own
    store (``feats/selftag``): the clips may also be in a captioned dataset under the same keys, and the
    text key ``clip#0`` would otherwise name that dataset's first caption."""
    from atae.evaluate import folder_dataset
    from atae.features import FeatureStore, ensure_dataset_features, extract_text
    from atae.selftag import self_tagged_dataset

    root = Path(noisy_audio)
    atab, _, report = ensure_dataset_features(folder_dataset(root), audio_tower, text_tower, feats,
                                              progress=progress)
    echo(f"features {root.name} (audio): {report.summary()}")

    def tags_for(path: Path):
        key = path.relative_to(root).as_posix()
        return atab.tags(key) if key in atab else None

    ds = self_tagged_dataset(root, audio_tower, progress=progress, tags_for=tags_for)
    ttab = FeatureStore(Path(feats) / "selftag").text_table(text_tower.info)
    items = [(caption_key(c.key, i), cap) for c in ds.clips for i, cap in enumerate(c.captions)]
    rep = extract_text(ttab, text_tower, items, progress=progress)
    echo(f"features {ds.name} (pseudo-captions): {rep.summary()}")
    return ds, atab, ttab
