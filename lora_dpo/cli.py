"""`lora-dpo` command line: thin; parses arguments and calls the modules that do the work.

Exit codes: 0 success, 2 a bad recipe, bad data or bad arguments (one message, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

EXAMPLES = """examples:
  lora-dpo train recipes/toy.yaml
  lora-dpo sft recipes/toy-sft.yaml && lora-dpo train recipes/toy-dpo-from-sft.yaml
  lora-dpo train recipes/qwen2.5-1.5b-8gb.yaml data.train=my_pairs.jsonl train.lr=1e-5
  lora-dpo compare --adapter runs/toy --prompt "write a review of the night river ."
  lora-dpo plan recipes/llama3.1-8b-16gb.yaml --gpu-memory 8GB
  lora-dpo app
"""



def add_recipe_arguments(parser, where: str | None, example: str) -> None:
    """The two positional arguments of every command that reads a recipe: its path and dotted overrides."""
    parser.add_argument("recipe", help=f"path to a YAML recipe ({where})" if where else "path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-dpo",
        description="DPO with a LoRA adapter on a 4-bit base model, on one small GPU.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train an adapter with DPO from a YAML recipe",
                       description="Train; Ctrl-C or SIGTERM saves a checkpoint and exits 130; resume=true continues.")
    add_recipe_arguments(t, "see recipes/", "train.lr=1e-4")
    f = sub.add_parser("sft", help="supervised fine-tuning of an adapter on responses (the stage before DPO)",
                       description="Train a LoRA adapter on prompt/response data, loss on the responses only "
                                   "(the recipe's stage is set to sft). A DPO recipe starts from it with "
                                   "model.adapter=<this run>, which then is its reference.")
    add_recipe_arguments(f, "see recipes/toy-sft.yaml", "train.lr=1e-4")
    d = sub.add_parser("data", help="check a recipe's data and print its report, without loading the model")
    add_recipe_arguments(d, None, "data.train=pairs.jsonl")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    from .compare import add_parser as add_compare_parser
    from .export import add_parser as add_export_parser

    from .plan import add_parser as add_plan_parser

    add_compare_parser(sub)
    add_export_parser(sub)
    add_plan_parser(sub)
    from lora_dpo_app.main import add_parser as add_app_parser

    add_app_parser(sub)
    return p


def _version() -> str:
    from . import __version__

    return __version__




def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad arguments
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers pool
    from .stopping import Interrupted

    try:
        if args.command in ("train", "sft"):
            from .config import load_recipe
            from .trainer import train

            extra = ["stage=sft"] if args.command == "sft" else []
            train(load_recipe(args.recipe, list(args.overrides) + extra))
        elif args.command == "data":
            import json

            from .config import load_recipe
            from .data import inspect_data

            report = inspect_data(load_recipe(args.recipe, args.overrides))
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        elif args.command == "compare":
            from .compare import run

            return run(args)
        elif args.command == "export":
            from .export import run

            return run(args)
        elif args.command == "plan":
            from .plan import run

            return run(args)
        elif args.command == "app":
            from lora_dpo_app.main import run

            return run(args)
    except UserError as exc:
        print(f"lora-dpo: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"lora-dpo: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lora-dpo: interrupted at once; the last checkpoint is the newest complete one", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
