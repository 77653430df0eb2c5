"""`lora-dpo` command line: thin; parses arguments and calls the module that does the work.

The arguments of every command are arguments.py's, a light module, so `lora-dpo --help` and each command's help
answer without importing torch; the command that runs is imported by its module's name (`module` in the
parsed arguments), as pip and Django load theirs. Commands from other installed packages (the app: `lora-dpo
app`) join through the entry-point group `lora_dpo.commands`: a light module with `add_parser(subparsers)`
whose subparser sets `module`, the module with `run(args)`.

Exit codes: 0 success, 2 a bad recipe, bad data or bad arguments (one message, no traceback),
130 interrupted.

SIGINT and SIGTERM are handled from the first line of `main`, whatever the process inherited (a shell's background
job, the app started from one, inherits SIGINT ignored): a trainer stopped while it prepares ends at once with one
line; training/stopping.py says what a stop does later.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from importlib.metadata import entry_points, version

from ..errors import Interrupted, UserError
from ..terminal import lines_off_terminal
from ..training.stopping import EARLY_STOP, StoppedEarly, handle_stop_signals, restore_signals
from .arguments import COMMANDS

EXAMPLES = """examples:
  lora-dpo train toy                                   (a shipped recipe, by its name: lora-dpo recipes)
  lora-dpo sft recipes/toy-sft.yaml && lora-dpo train recipes/toy-dpo-from-sft.yaml
  lora-dpo train recipes/qwen2.5-1.5b-8gb.yaml data.train=my_pairs.jsonl train.lr=1e-5
  lora-dpo compare --adapter runs/toy --prompt "write a review of the night river ."
  lora-dpo plan recipes/llama3.1-8b-16gb.yaml --gpu-memory 8GB
  lora-dpo app
"""

LIGHT = {"lora_dpo.cli.recipes"}  # commands that start at once; the others first import torch (seconds, or more)
PLUGINS = "lora_dpo.commands"  # entry-point group of commands other packages add (lora_dpo_app: `app`)
INTERRUPTED = 130
TRAINER = "lora_dpo.cli.train"  # the module of `train` and `sft`
TRAINING = {TRAINER, "lora_dpo.cli.sweep"}  # the commands that train, whose stops are handled here from the start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-dpo",
        description="DPO with a LoRA adapter on a 4-bit base model, on one small GPU.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version('lora-dpo')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for entry in sorted(entry_points(group=PLUGINS), key=lambda e: e.name):
        entry.load().add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    inherited = handle_stop_signals()  # first: a Stop from the first second, even with SIGINT ignored by a shell
    args = None
    try:
        args = parser().parse_args(argv)  # argparse itself exits 2 on bad arguments (and 0 after a --help)
        if args.module not in TRAINING:
            restore_signals(inherited)  # the other commands keep what they inherited (the app sets its own)
        return _run(args)
    except StoppedEarly:  # a run stopped while preparing (or a command before it began): nothing to save
        _exit_quietly()
        if args is None:
            line = "stopped before it began; nothing was done"
        elif args.module == TRAINER:
            line = EARLY_STOP
        else:  # a sweep: the point it was preparing
            line = (f"{args.command}: stopped while a run was preparing: that run was not trained and has no "
                    "checkpoint; the same command again continues")
        print(f"lora-dpo: {line}", file=sys.stderr, flush=True)
        return INTERRUPTED
    finally:
        restore_signals(inherited)


def _exit_quietly() -> None:
    """Once the stop is caught, a further SIGINT/SIGTERM ends the process at once (the default action) instead of
    raising in the middle of its exit; what was inherited comes back when `main` returns."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)


def _run(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers pool
    try:
        if args.module not in LIGHT and args.module not in sys.modules:
            print(f"lora-dpo {args.command}: loading PyTorch and the model libraries ...", file=sys.stderr, flush=True)
        with lines_off_terminal():  # off a terminal (a log file, the app), libraries' bars become lines too
            command = importlib.import_module(args.module)  # the command's own module, heavy imports and all
            return command.run(args)
    except UserError as exc:
        print(f"lora-dpo: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # a safe stop wrote its checkpoint
        _exit_quietly()
        print(f"lora-dpo: {exc}", file=sys.stderr)
        return INTERRUPTED
    except StoppedEarly:
        raise  # main says it, in one line (a KeyboardInterrupt, but not one that stopped training at once)
    except KeyboardInterrupt:
        _exit_quietly()
        print("lora-dpo: interrupted at once; the last checkpoint is the newest complete one", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `lora-dpo recipes | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
