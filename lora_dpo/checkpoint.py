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
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.json"  # written last inside the folder: its presence marks a complete checkpoint
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    beta: Optional[float] = None  # adaptive beta's current value (None: the recipe's fixed loss.beta)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, state: TrainerState, model, optimizer, scheduler, scaler=None, keep_last=None,
                    rng_states: list[dict] | None = None, adapter_state: dict | None = None) -> Path:
    """Write `checkpoints/step-{state.step}` atomically; prune to the newest `keep_last`. Returns the folder.

    `rng_states`: every process's `rng_state()`, in process order (default: this process's only).
    `adapter_state`: the adapter's weights when `model` holds only a shard of them (FSDP, ZeRO-3); then
    `optimizer` is None: its state is sharded too, and a resumed run restarts its moments."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp / "adapter"), state_dict=adapter_state, selected_adapters=["default"])
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng_states = rng_states or [rng_state()]
    torch.save({**rng_states[0], "processes": rng_states}, tmp / "rng.pt")  # top level: process 0's
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and (child / "adapter").is_dir():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found)]


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Folders a killed save left behind: temporary ones, or step folders missing their state file."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    complete = set(complete_checkpoints(run_dir))
    return sorted(p for p in root.iterdir() if p.is_dir() and p not in complete)


def find_resume_checkpoint(run_dir: Path, resume) -> Path | None:
    """`resume=true`: the newest complete checkpoint of the run (None when there is none);
    `resume=<path>`: that checkpoint, which must be complete."""
    if resume is True:
        for bad in incomplete_checkpoints(run_dir):
            print(f"notice: skipping incomplete checkpoint {bad}", file=sys.stderr)
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        from .errors import ConfigError

        raise ConfigError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None, rank: int = 0, processes: int = 1) -> TrainerState:
    """Restore everything `save_checkpoint` wrote; returns the loop position. Each process takes its own RNG
    states when the checkpoint was written by as many processes, else those of process 0."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, adapter)
    if optimizer is not None:
        if (path / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        else:
            print(f"notice: {path} holds no optimizer state (a sharded run's); the optimizer starts afresh",
                  file=sys.stderr)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    per_process = rng.get("processes", [])
    _set_rng_state(per_process[rank] if len(per_process) == processes else rng)
    saved = json.loads((path / STATE_FILE).read_text())
    if "pairs_seen" not in saved:
        from .errors import ConfigError

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
