"""Run a sweep: one ordinary run directory per grid point under the sweep folder, one after another (under
`accelerate launch` every point runs on all processes), then the frontier (frontier.py) in `sweep.json` and
`frontier.png`, rewritten after every point so that a reader (the app) sees points arrive.

The reference log-probs do not depend on the loss's beta, so they are computed once: the points share the
reference cache (training/refcache.py; a recipe with `train.reference_cache: null` gets one inside the sweep folder)
and the second point on reads the first one's tables. A killed sweep, run again with the same command, skips the
points that finished, resumes the one that has a checkpoint, and trains the rest; a run in a point's folder whose
recipe is not the sweep's (its length included) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..config import Recipe, flat, load_recipe, to_dict
from ..errors import ConfigError
from ..progress import say
from ..run.rundir import RunDir, atomic_text
from ..training.distributed import is_main_process
from ..training.loop import train
from .frontier import Frontier, draw, frontier_of
from .grid import Grid

SWEEP_FILE = "sweep.json"
FRONTIER_PNG = "frontier.png"


def sweep_folder(recipe: Recipe, out: Optional[str] = None) -> Path:
    """Where a sweep's runs go: `out`, else the recipe's output_dir with `-sweep` added."""
    return Path(out).expanduser() if out else Path(recipe.output_dir.rstrip("/") + "-sweep")


def plan(recipe_path: str, overrides: list[str], grid: Grid, folder: Path) -> list[tuple[str, Recipe, str]]:
    """(name, recipe, state) of every grid point, every recipe checked before anything runs. state: `done` (its
    final evaluation is there), `resume` (a checkpoint to continue from) or `new`."""
    base = load_recipe(recipe_path, overrides)
    shared = [] if base.train.reference_cache else [f"train.reference_cache={folder / 'reference_logps'}"]
    out = []
    for name, point in grid.points():
        run = RunDir(folder / name)
        keys = [*overrides, *point, *shared, f"output_dir={run.path}"]
        if run.eval.is_file():
            state = "done"
        elif run.complete_checkpoints():
            state = "resume"
        else:
            state = "new"
        control = {"done": [], "resume": ["resume=true", "overwrite=false"],
                   "new": ["resume=false", f"overwrite={'true' if run.existing_outputs() else 'false'}"]}[state]
        try:
            recipe = load_recipe(recipe_path, [*keys, *control])
        except ConfigError as exc:
            raise ConfigError(f"sweep point {name}: {exc}") from None
        if state != "new":
            _check_same_point(recipe, run, name)
        out.append((name, recipe, state))
    return out


# what may differ between a point and the run already in its folder: where it is, and how it is started
_MAY_DIFFER = {"output_dir", "resume", "overwrite", "train.reference_cache"}


def _check_same_point(recipe: Recipe, run: RunDir, name: str) -> None:
    """A run already in a point's folder is that point's only when it trains the same way, length included (a
    resume may change train.max_steps; a frontier of runs of different lengths would compare nothing)."""
    saved, now = flat(to_dict(load_recipe(run.config))), flat(to_dict(recipe))
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in _MAY_DIFFER)
    if changed:
        raise ConfigError(f"sweep point {name}: {run.path} holds a run whose recipe differs in {', '.join(changed)}; "
                          "a sweep compares runs trained the same way: give this sweep another --out, or remove "
                          "that run")


def run_sweep(recipe_path: str, overrides: list[str], grid: Grid, out: Optional[str] = None,
              train_fn: Callable[[Recipe], dict] = train) -> Frontier:
    """Train every point of `grid` not yet finished (see `plan`) and return the frontier, written to the sweep
    folder's sweep.json and frontier.png. A point that fails stops the sweep (its error is the trainer's);
    running the same command again continues."""
    folder = sweep_folder(load_recipe(recipe_path, overrides), out)
    points = plan(recipe_path, overrides, grid, folder)
    todo = [p for p in points if p[2] != "done"]
    say(f"sweep: {len(points)} points in {folder} ({len(points) - len(todo)} finished already); "
        + ", ".join(f"{name} ({state})" for name, _, state in points))
    runs = [(name, folder / name) for name, _, _ in points]
    front = None
    for i, (name, recipe, state) in enumerate(todo, 1):
        say(f"sweep: point {i} of {len(todo)} to train: {name}"
            + (" (resuming from its checkpoint)" if state == "resume" else ""))
        train_fn(recipe)
        front = frontier_of(runs)  # after every point: a reader (the app) sees the points arrive
        _write(folder, grid, recipe_path, overrides, front)
    if front is None:  # every point had finished: the record is written again, as this sweep sees it
        front = frontier_of(runs)
        _write(folder, grid, recipe_path, overrides, front)
    return front


def _write(folder: Path, grid: Grid, recipe_path: str, overrides: list[str], front: Frontier) -> None:
    if not is_main_process():
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = {"recipe": str(recipe_path), "overrides": list(overrides), "grid": grid.as_dict(),
              "frontier": front.to_dict(), "png": FRONTIER_PNG}
    atomic_text(folder / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    draw(front, folder / FRONTIER_PNG)


def read_sweep(folder: str | Path) -> Optional[dict]:
    """A sweep folder's sweep.json (None when there is none yet, or it cannot be read)."""
    try:
        return json.loads((Path(folder) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
