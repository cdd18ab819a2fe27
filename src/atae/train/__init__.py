"""Training the adapters: recipes (``recipe``), tensors of the training data (``data``), the loop with
early stopping, checkpoints and resume (``loop``), and running a whole recipe (``runner``)."""

from atae.train.data import PackedSeqs, PairSet, TableSeqs, TrainData, ValData, embed_packed, preload_budget
from atae.train.loop import CHECKPOINT_NAME, StageResult, plot_learning_curve, seed_everything, train_stage
from atae.train.recipe import (
    DATA_SOURCES,
    Recipe,
    Stage,
    TrainConfig,
    load_recipe,
    load_recipe_from,
    recipe_names,
)
from atae.train.runner import CURVE_NAME, LOG_NAME, RunResult, run_recipe, train_from_files

__all__ = [
    "CHECKPOINT_NAME",
    "CURVE_NAME",
    "DATA_SOURCES",
    "LOG_NAME",
    "PackedSeqs",
    "PairSet",
    "Recipe",
    "RunResult",
    "Stage",
    "StageResult",
    "TableSeqs",
    "TrainConfig",
    "TrainData",
    "ValData",
    "embed_packed",
    "load_recipe",
    "load_recipe_from",
    "plot_learning_curve",
    "preload_budget",
    "recipe_names",
    "run_recipe",
    "seed_everything",
    "train_from_files",
    "train_stage",
]
