"""`lora-dpo compare --adapter DIR [--adapter DIR2] --prompt TEXT ...`: reference vs tuned answers (or adapter A
vs B), same seed, each with its implicit reward (compare.py does the work)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..compare import Comparer, Sampling, format_rows, read_prompts
from ..errors import UserError

EXAMPLES = """examples:
  lora-dpo compare --adapter runs/toy --prompt "write a review of the night river ."
  lora-dpo compare --adapter runs/a --adapter runs/b --prompts-file prompts.txt --json
"""


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="answers of the reference and a tuned adapter (or two adapters), side by side",
                       description="Sample answers for the same prompts from the reference (adapter off) and the "
                                   "tuned adapter, or from adapters A and B, with each answer's implicit reward.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="a run directory or adapter folder; twice to compare two adapters of one base")
    c.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    c.add_argument("--prompts-file", metavar="FILE", help="prompts: one per line, or .json/.jsonl rows with 'prompt'")
    c.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 decodes greedily (default %(default)s)")
    c.add_argument("--top-p", type=float, default=Sampling.top_p, help="nucleus sampling (default %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens, help="default %(default)s")
    c.add_argument("--seed", type=int, default=Sampling.seed, help="sampling seed, the same for every pane")
    c.add_argument("--score-with", choices=["tuned", "A", "B"], help="adapter whose implicit reward scores the answers")
    c.add_argument("--beta", type=float, help="beta of the rewards (default: the beta the run ended with)")
    c.add_argument("--base", help="the base model, when the adapter's own record does not say it")
    c.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    c.set_defaults(run=run)


def run(args) -> int:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("give at least one --prompt TEXT or a --prompts-file FILE")
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    sampling.check()  # before the model loads
    comparer = Comparer.load(args.adapter, base=args.base, device=args.device, beta=args.beta)
    rows = comparer.compare(prompts, sampling, args.score_with)
    if args.json:
        print(json.dumps({"base": comparer.base, "adapters": [asdict(a) for a in comparer.adapters],
                          "sampling": asdict(sampling), "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_rows(rows, comparer))
    return 0
