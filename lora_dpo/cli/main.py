"""`lora-dpo` command line: thin; parses arguments and calls the modules that do the work, one module per
command. Commands from other installed packages (the app: `lora-dpo app`) join through the entry-point group
`lora_dpo.commands`: a module with `add_parser(subparsers)` whose subparser sets `run`.

Exit codes: 0 success, 2 a bad recipe, bad data or bad arguments (one message, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points, version

from ..errors import UserError
from ..training.stopping import Interrupted
from . import compare, data, export, plan, train

EXAMPLES = """examples:
  lora-dpo train recipes/toy.yaml
  lora-dpo sft recipes/toy-sft.yaml && lora-dpo train recipes/toy-dpo-from-sft.yaml
  lora-dpo train recipes/qwen2.5-1.5b-8gb.yaml data.train=my_pairs.jsonl train.lr=1e-5
  lora-dpo compare --adapter runs/toy --prompt "write a review of the night river ."
  lora-dpo plan recipes/llama3.1-8b-16gb.yaml --gpu-memory 8GB
  lora-dpo app
"""

PLUGINS = "lora_dpo.commands"  # entry-point group of commands other packages add (lora_dpo_app: `app`)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-dpo",
        description="DPO with a LoRA adapter on a 4-bit base model, on one small GPU.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version('lora-dpo')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, data, compare, export, plan):
        command.add_parser(sub)
    for entry in sorted(entry_points(group=PLUGINS), key=lambda e: e.name):
        entry.load().add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # argparse itself exits 2 on bad arguments
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers pool
    try:
        return args.run(args)
    except UserError as exc:
        print(f"lora-dpo: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"lora-dpo: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lora-dpo: interrupted at once; the last checkpoint is the newest complete one", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
