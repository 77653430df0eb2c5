"""`lora-dpo sweep RECIPE [KEY=VALUE ...] --grid KEY=V1,V2,... [--grid ...] [--out DIR]`."""

from __future__ import annotations

import shlex

from ..sweep import parse_grid, run_sweep
from ..sweep.runner import FRONTIER_PNG, SWEEP_FILE, sweep_folder
from ..config import load_recipe
from ..errors import Interrupted


def run(args) -> int:
    grid = parse_grid(args.grid)
    try:
        front = run_sweep(args.recipe, list(args.overrides), grid, args.out)
    except Interrupted as exc:  # the point in training saved its checkpoint: the sweep, not that run, continues
        again = shlex.join(["lora-dpo", "sweep", args.recipe, *args.overrides,
                            *[a for spec in args.grid for a in ("--grid", spec)], *(["--out", args.out] if args.out else [])])
        raise Interrupted(f"{str(exc).split('; resume with')[0]}; the sweep continues (finished points kept, this "
                          f"one resumed) with the same command: {again}") from None
    folder = sweep_folder(load_recipe(args.recipe, list(args.overrides)), args.out)
    print(front.table())
    print(f"written: {folder / SWEEP_FILE}, {folder / FRONTIER_PNG}")
    if front.recommended:
        print(f"next: lora-dpo compare --adapter {folder / front.recommended} --prompt '...', or export it: "
              f"lora-dpo export {folder / front.recommended} --out exports/{front.recommended}")
    return 0
