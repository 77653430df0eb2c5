"""Experiment trackers through accelerate (`train.report_to`): checked before anything loads, named the usual way.

Every tracker accelerate supports is accepted. One that is not installed is a recipe error naming the package to
install (TRL raises too; before, lora-dpo dropped it without a word). The project is `train.project`, else the
tracker's own environment variable, else "lora-dpo"; the run's name is `train.run_name`, else the run directory's.
"""

from __future__ import annotations

import os

from accelerate.utils import imports

from ..config import Recipe
from ..errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
PROJECT_ENV = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME", "comet_ml": "COMET_PROJECT_NAME",
               "trackio": "TRACKIO_PROJECT"}
# where each tracker's init takes the run's name (accelerate passes init_kwargs[tracker] to it)
RUN_NAME_KWARG = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "swanlab": "experiment_name"}


def check_trackers(recipe: Recipe) -> None:
    """Refuse a tracker whose package is missing, naming what to install."""
    missing = [t for t in recipe.train.report_to if not getattr(imports, f"is_{t}_available")()]
    if missing:
        raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed; pip install "
                          f"{' '.join(PACKAGES[t] for t in missing)}, or leave it out of train.report_to")


def project_name(recipe: Recipe) -> str:
    t = recipe.train
    env = [os.environ[PROJECT_ENV[k]] for k in t.report_to if k in PROJECT_ENV and os.environ.get(PROJECT_ENV[k])]
    return t.project or (env[0] if env else "lora-dpo")


def init_kwargs(recipe: Recipe, run_dir_name: str) -> dict:
    name = recipe.train.run_name or run_dir_name
    return {t: {RUN_NAME_KWARG[t]: name} for t in recipe.train.report_to if t in RUN_NAME_KWARG}
