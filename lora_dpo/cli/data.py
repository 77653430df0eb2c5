"""`lora-dpo data RECIPE [KEY=VALUE ...] [--json]`: check a recipe's data and print its report; loads no model."""

from __future__ import annotations

import json
import sys

from ..config import Recipe, load_recipe
from ..data.report import DataReport
from ..errors import DataError, UserError
from ..methods import method_class
from ..model.load import load_tokenizer


def inspect_data(recipe: Recipe) -> DataReport:
    """The data report of a recipe: loads only the tokenizer, builds the examples exactly as `train` would (the
    recipe's method's, with the same tokenisation, truncation and eval split), and returns the report. Raises
    DataError or ConfigError for what the user must fix."""
    return method_class(recipe).load(recipe, load_tokenizer(recipe.model)).report


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        report = inspect_data(recipe)
    except DataError as exc:
        # a recipe that `lora-dpo sft` runs says nothing of its stage: its rows are examples, not pairs
        if recipe.stage != "dpo" or any(o.split("=", 1)[0] == "stage" for o in args.overrides):
            raise
        try:
            report = inspect_data(load_recipe(args.recipe, [*args.overrides, "stage=sft"]))
        except UserError:
            raise exc from None
        print("notice: these rows are not preference pairs; read as SFT examples, the data of `lora-dpo sft` "
              "(add stage=sft to say so; `lora-dpo train` would refuse them)", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0
