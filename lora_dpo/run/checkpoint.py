"""Checkpoints that resume exactly: `checkpoints/step-N/` holds the adapter, the optimizer, the scheduler, the
gradient scaler, every RNG state and the data position.

accelerate's `save_state` would write the whole model, 4-bit base included (gigabytes per checkpoint);
only the adapter trains, so only the adapter is saved. A checkpoint is written to a hidden temporary folder
and renamed into place, so a process killed at any instant (SIGKILL included) leaves either a complete
checkpoint or a temporary folder that resume ignores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import ConfigError, first_line
from .rundir import ADAPTER_DIR, STATE_FILE, RunDir, usual_modes


@dataclass
class TrainerState:
    """Where the loop stands, in plain numbers (JSON)."""

    step: int = 0  # optimizer steps taken
    pairs_seen: int = 0  # pairs of the data stream consumed (the epochs' permutations end to end)
    pairs_per_step: int = 0  # the global batch, batch_size x grad_accum x processes (0: not yet known)
    processes: int = 1  # processes that wrote the checkpoint
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    window: dict = field(default_factory=dict)  # metrics of a logging window still open at save time
    baseline: dict = field(default_factory=dict)  # the reference model's eval metrics (for eval.json)
    beta: Optional[float] = None  # the beta of the step to come (adaptive beta moves it); None: loss.beta


# a sharded run's optimizer state, written into the checkpoint by every process (training/distributed.py)
SHARDED_OPTIMIZER = "optimizer_sharded"


def staging(run: RunDir | Path, step: int) -> Path:
    """The hidden folder a checkpoint of `step` is written into before its rename, empty (the main process makes
    it; under FSDP / ZeRO-3 every process then writes its part of the optimizer state there, SHARDED_OPTIMIZER)."""
    tmp = RunDir.of(run).staging(step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(run: RunDir | Path, state: TrainerState, write_adapter: Callable[[Path], None], optimizer,
                    scheduler, scaler=None, keep_last=None, rng_states: list[dict] | None = None,
                    staged: Optional[Path] = None) -> Path:
    """Write `checkpoints/step-{state.step}` atomically; prune to the newest `keep_last`. Returns the folder.

    `write_adapter(folder)` writes the adapter into `folder` (model/adapters.py). `rng_states`: every process's
    `rng_state()`, in process order (default: this process's only). `optimizer` None: its state is sharded
    across processes (FSDP, ZeRO-3) and was written into `staged` (see `staging`) by every process already."""
    run = RunDir.of(run)
    final = run.checkpoint(state.step)
    tmp = staged if staged is not None else staging(run, state.step)
    root = tmp.parent
    write_adapter(tmp / ADAPTER_DIR)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng_states = rng_states or [rng_state()]
    torch.save({**rng_states[0], "processes": rng_states}, tmp / "rng.pt")  # top level: process 0's
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    usual_modes(tmp)  # safetensors writes 0600 files; a checkpoint is read like any run file
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last:
        for old in run.complete_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return RunDir.of(run).complete_checkpoints()


def checkpoint_problem(path: Path) -> str | None:
    """What is broken in a complete-looking checkpoint, naming the file (None when every file reads): a truncated
    tensor file, a state file that is not JSON, a missing RNG file. Reads each file once; a LoRA checkpoint is
    small."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return f"{path / STATE_FILE}: {first_line(exc)}"
    weights = next((path / ADAPTER_DIR / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (path / ADAPTER_DIR / n).exists()), path / ADAPTER_DIR / "adapter_model.safetensors")
    try:
        if weights.suffix == ".safetensors":
            load_file(weights)
        else:
            torch.load(weights, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled file raises what its reader raises
        return f"{weights}: {first_line(exc)}"
    for name, required in (("rng.pt", True), ("scheduler.pt", True), ("optimizer.pt", False), ("scaler.pt", False)):
        file = path / name
        if not file.exists() and not required:
            continue
        try:
            torch.load(file, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - as above
            return f"{file}: {first_line(exc)}"
    return None


def find_resume_checkpoint(run: RunDir | Path, resume) -> Path | None:
    """`resume=true`: the newest complete checkpoint of the run whose files all read, saying which newer ones are
    broken and why (None when there is none); `resume=<path>`: that checkpoint, which must be complete and whole."""
    run = RunDir.of(run)
    if resume is True:
        for bad in run.incomplete_checkpoints():
            print(f"notice: skipping incomplete checkpoint {bad}", file=sys.stderr)
        broken = []
        for path in reversed(run.complete_checkpoints()):
            problem = checkpoint_problem(path)
            if problem is None:
                if broken:
                    print(f"notice: resuming from {path}, the newest checkpoint whose files all read", file=sys.stderr)
                return path
            broken.append(problem)
            print(f"notice: skipping broken checkpoint {path} ({problem})", file=sys.stderr)
        if broken:
            raise ConfigError(f"resume: every checkpoint of {run.path} is broken, the newest at {broken[0]}; start "
                              "again with overwrite=true, or restore the files")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    if (problem := checkpoint_problem(path)) is not None:
        raise ConfigError(f"resume: {path} is broken: {problem}; resume=true takes the newest checkpoint that is whole")
    return path


def load_checkpoint(path: Path, optimizer, scheduler, scaler=None, rank: int = 0, processes: int = 1) -> TrainerState:
    """Restore everything `save_checkpoint` wrote but the adapter (the caller loads `path / ADAPTER_DIR` into the
    model: model/adapters.py) and a sharded optimizer state (`optimizer` None: the caller restores it once the
    engine has wrapped model and optimizer, training/distributed.py); returns the loop position. Each process takes
    its own RNG states when the checkpoint was written by as many processes, else those of process 0."""
    if optimizer is not None:
        if (path / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        else:
            print(f"notice: {path} holds no optimizer state of one process (a sharded run's); the optimizer starts "
                  "afresh", file=sys.stderr)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    per_process = rng.get("processes", [])
    _set_rng_state(per_process[rank] if len(per_process) == processes else rng)
    saved = json.loads((path / STATE_FILE).read_text())
    if "pairs_seen" not in saved:
        raise ConfigError(f"resume: {path} was written by an earlier lora-dpo that counted its data position in "
                          "micro-batches; start a new output_dir")
    return TrainerState(**saved)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk so a power cut cannot undo a rename (best effort: not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
