"""The Python API: train a recipe on its own data or on rows held in memory, and get the run back.

    recipe = lora_dpo.load_recipe("recipes/toy.yaml", ["output_dir=runs/notebook", "train.max_steps=20"])
    result = lora_dpo.train(recipe, data=rows)        # rows: a datasets.Dataset or a list of dicts
    result.metrics["rewards/accuracies"], result.run.adapter

A recipe built in Python (`lora_dpo.Recipe(...)`) is checked as it is built, exactly as one read from YAML, and
fails with the same message. Rows in memory are written to the run directory (`data/train.jsonl`,
`data/eval.jsonl`) and the recipe points at them, so the run's config.yaml trains the same data again and a
resumed run (`resume=true`) reads what the first one read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .config import Recipe, load_recipe
from .data.sources import eval_is_split
from .errors import ConfigError, DataError
from .methods import method_class
from .model.load import load_tokenizer
from .run.rundir import RunDir, atomic_text
from .training.loop import train as train_recipe

Rows = Any  # a datasets.Dataset, or a list of dicts (rows in any format `lora-dpo data` recognises)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left: its directory, its final evaluation (eval.json), the recipe it trained."""

    run: RunDir
    metrics: dict  # the final held-out metrics, the reference's beside them ("baseline") and the final "beta"
    recipe: Recipe

    @property
    def adapter(self) -> Path:
        return self.run.adapter


def _records(rows: Rows, what: str) -> list[dict]:
    records = rows.to_list() if hasattr(rows, "to_list") else rows
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{what}: expected a datasets.Dataset or a list of dicts, got {type(rows).__name__}")
    if not records:
        raise DataError(f"{what}: no rows")
    return records


def _write_rows(rows: Rows, path: Path, what: str, resuming: bool) -> str:
    """The rows as JSON lines at `path`; a resumed run must be given the rows it started with."""
    lines = []
    for i, record in enumerate(_records(rows, what)):
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{what}: row {i} cannot be written as JSON: {exc}") from None
    text = "".join(f"{line}\n" for line in lines)
    if resuming and path.is_file() and path.read_text(encoding="utf-8") != text:
        raise ConfigError(f"resume: the rows given as {what} differ from those the run started with ({path}); "
                          "pass the same rows, or start a new output_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, text)
    return str(path.resolve())  # (config.yaml then names the file from any folder)


def train(recipe: Union[Recipe, str, Path], data: Optional[Rows] = None, eval_data: Optional[Rows] = None,
          overrides: list[str] = ()) -> TrainResult:
    """Train `recipe` (a Recipe, or the path of a YAML recipe read with `overrides`) and return the run.

    `data`, `eval_data`: rows in memory (a datasets.Dataset or a list of dicts) to train and evaluate on instead
    of the recipe's data.train / data.eval; without `eval_data`, data.eval_fraction of `data` is held out (unless
    data.eval names another file or dataset). Raises the same errors as `lora-dpo train`: ConfigError and
    DataError (UserError) for what the user can fix, `Interrupted` after a safe stop, and `StoppedEarly` (a
    KeyboardInterrupt) for a stop before the first step, when nothing was trained."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        raise ConfigError("overrides: give them to load_recipe, or use dataclasses.replace on a Recipe")
    if data is not None or eval_data is not None:
        run = RunDir(recipe.output_dir)
        resuming = bool(recipe.resume)
        run.check_fresh(recipe.overwrite or resuming)  # (nothing is written into a run that would be refused)
        changes = {}
        if data is not None:
            changes["train"] = _write_rows(data, run.data_file("train"), "data", resuming)
            changes["train_split"] = "train"  # (a file's one split)
            if eval_data is None and recipe.data.eval is not None and eval_is_split(recipe.data.eval):
                changes["eval"] = None  # a split of the recipe's own data.train, which these rows replace
        if eval_data is not None:
            changes["eval"] = _write_rows(eval_data, run.data_file("eval"), "eval_data", resuming)
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **changes))
    metrics = train_recipe(recipe)
    return TrainResult(RunDir(recipe.output_dir), metrics, recipe)


def preview_data(recipe: Recipe, rows: int = 5) -> tuple[list[dict], str]:
    """The first `rows` training examples of `recipe` as the trainer reads them: the format detected, the prompt
    rendered through the model's chat template and the replies as their tokens decode (special tokens shown), and
    the data report's summary. Loads the tokenizer only; raises DataError / ConfigError as training would."""
    limited = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_rows=rows, eval_fraction=0.0,
                                                                   eval=None))
    tokenizer = load_tokenizer(limited.model)
    data = method_class(limited).load(limited, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    out = []
    for item in data.train[:rows]:
        if hasattr(item, "chosen_ids"):  # a preference pair
            out.append({"row": item.index, "prompt": decode(item.prompt_ids), "chosen": decode(item.chosen_ids),
                        "rejected": decode(item.rejected_ids)})
        else:  # an SFT or KTO example
            out.append({"row": item.index, "prompt": decode(item.prompt_ids), "completion": decode(item.completion_ids),
                        "desirable": item.desirable})
    return out, data.report.format()
