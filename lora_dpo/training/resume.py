"""What a resumed run may change, checked before anything loads: the recipe (only how long it trains, what it
records and how it spends memory) and the global batch (any split into batch_size x grad_accum x processes
that keeps it)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Recipe, flat, load_recipe, to_dict
from ..errors import ConfigError
from ..run.rundir import STATE_FILE

# Keys a resumed run may change: how long it trains, what it records and how it spends memory, not what it computes.
# The split of the global batch into batch_size x grad_accum x processes may change too: it is checked on its own.
# output_dir: a run folder moved elsewhere resumes where it now is
RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.report_to", "train.project", "train.run_name", "train.batch_size", "train.grad_accum",
                     "train.reference_cache", "train.activation_offload", "train.embeddings_on_cpu",
                     "train.mlp_chunks", "model.gradient_checkpointing"}


def check_same_recipe(recipe: Recipe, saved_path: Path) -> None:
    """A resumed run must compute what the interrupted one computed; refuse other changes by name."""
    saved, now = flat(to_dict(load_recipe(saved_path))), flat(to_dict(recipe))
    # (with rounds, the steps per round place the round boundaries: they stay as they were)
    resumable = RESUMABLE_CHANGES - ({"train.epochs", "train.max_steps"} if recipe.train.rounds > 1 else set())
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in resumable)
    if changed:
        raise ConfigError(
            f"resume: the recipe differs from the run's {saved_path} in {', '.join(changed)}; "
            "a resumed run must train the same way (start a new output_dir to change them)"
        )


def check_same_global_batch(checkpoint: Path, t, world: int) -> None:
    """A checkpoint resumes with any number of processes that keeps its global batch (pairs per optimizer
    step): the data stream, the step count and the schedule are then those of the interrupted run."""
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    before = saved.get("pairs_per_step", 0)
    now = t.batch_size * t.grad_accum * world
    if not before or before == now:
        return
    hints = []
    if before % (t.grad_accum * world) == 0:
        hints.append(f"train.batch_size={before // (t.grad_accum * world)}")
    if before % (t.batch_size * world) == 0:
        hints.append(f"train.grad_accum={before // (t.batch_size * world)}")
    hint = f"; with {world} process(es) set {' or '.join(hints)}" if hints else ""
    raise ConfigError(
        f"train.batch_size: {checkpoint} was written with a global batch of {before} pairs per step "
        f"({saved.get('processes', 1)} process(es)); this run would take {now} (train.batch_size {t.batch_size} x "
        f"train.grad_accum {t.grad_accum} x {world} process(es)). A resumed run must keep the global batch{hint}"
    )
