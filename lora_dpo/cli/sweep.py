"""`lora-dpo sweep RECIPE [KEY=VALUE ...] --grid KEY=V1,V2,... [--grid ...] [--out DIR]`."""

from __future__ import annotations

from ..sweep import parse_grid, run_sweep
from ..sweep.runner import FRONTIER_PNG, SWEEP_FILE, sweep_folder
from ..config import load_recipe


def run(args) -> int:
    grid = parse_grid(args.grid)
    front = run_sweep(args.recipe, list(args.overrides), grid, args.out)
    folder = sweep_folder(load_recipe(args.recipe, list(args.overrides)), args.out)
    print(front.table())
    print(f"written: {folder / SWEEP_FILE}, {folder / FRONTIER_PNG}")
    if front.recommended:
        print(f"next: lora-dpo compare --adapter {folder / front.recommended} --prompt '...', or export it: "
              f"lora-dpo export {folder / front.recommended} --out exports/{front.recommended}")
    return 0
