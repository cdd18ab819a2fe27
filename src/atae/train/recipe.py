"""Training recipes: the [train] settings and the one or two stages of a TOML recipe file."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from atae.errors import DataError

DATA_SOURCES = ("clean", "noisy")


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
