"""`lora-dpo train RECIPE [KEY=VALUE ...]` and `lora-dpo sft RECIPE [KEY=VALUE ...]`."""

from __future__ import annotations

from ..config import load_recipe
from ..training.loop import train
from .arguments import add_recipe_arguments


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train an adapter with DPO from a YAML recipe",
                       description="Train; Ctrl-C or SIGTERM saves a checkpoint and exits 130; resume=true continues.")
    add_recipe_arguments(t, "see recipes/", "train.lr=1e-4")
    t.set_defaults(run=run)
    f = sub.add_parser("sft", help="supervised fine-tuning of an adapter on responses (the stage before DPO)",
                       description="Train a LoRA adapter on prompt/response data, loss on the responses only "
                                   "(the recipe's stage is set to sft). A DPO recipe starts from it with "
                                   "model.adapter=<this run>, which then is its reference.")
    add_recipe_arguments(f, "see recipes/toy-sft.yaml", "train.lr=1e-4")
    f.set_defaults(run=run)


def run(args) -> int:
    extra = ["stage=sft"] if args.command == "sft" else []
    train(load_recipe(args.recipe, list(args.overrides) + extra))
    return 0
