"""`lora-dpo compare --adapter DIR [--adapter DIR2] --prompt TEXT ...`: reference vs tuned answers (or adapter A
vs B), same seed, each with its implicit reward (compare.py does the work)."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..compare.comparer import Comparer, format_rows, read_prompts
from ..compare.settings import Sampling
from ..errors import UserError



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
