"""Recipes: frozen dataclasses validated as they are built (recipe.py), read from YAML with `base:` and dotted
overrides (load.py), and the code a recipe names by `module:function` (callables.py)."""

from .callables import import_callable, load_scorer
from .load import flat, load_recipe, model_config, parse_overrides, read_yaml, save_recipe, to_dict
from .recipe import (REQUIRED, DataConfig, EvalConfig, LoraConfig, LossConfig, ModelConfig, OnlineConfig, Recipe,
                     TrainConfig)

__all__ = [
    "REQUIRED", "DataConfig", "EvalConfig", "LoraConfig", "LossConfig", "ModelConfig", "OnlineConfig", "Recipe",
    "TrainConfig", "flat", "import_callable", "load_recipe", "load_scorer", "model_config", "parse_overrides",
    "read_yaml", "save_recipe", "to_dict",
]  # fmt: skip
