"""`lora-dpo train RECIPE [KEY=VALUE ...]` and `lora-dpo sft RECIPE [KEY=VALUE ...]`."""

from __future__ import annotations

from ..config import load_recipe
from ..training.loop import train


def run(args) -> int:
    extra = ["stage=sft"] if args.command == "sft" else []
    train(load_recipe(args.recipe, list(args.overrides) + extra))
    return 0
