"""Stops: the safe stop on request (the first SIGINT or SIGTERM asks the loop to finish its optimizer step,
checkpoint and exit with code 130; a second SIGINT stops at once), and the stops a run makes itself: a streak of
non-finite steps, and running out of GPU memory, each turned into what the user can do about it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import torch

from ..errors import Interrupted, UserError

__all__ = ["Interrupted", "StopRequest", "diverged", "out_of_memory_advice"]


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag the training loop polls between steps."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread (e.g. not inside an app)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.requested = name
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def diverged(step: int, skipped_steps: int, checkpoints: list[Path]) -> UserError:
    """The error that ends a run after train.max_nonfinite_steps non-finite steps in a row."""
    kept = f"the last good checkpoint is kept: {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    return UserError(
        f"training stopped at step {step}: the loss or gradient norm was NaN/inf in "
        f"{skipped_steps} step(s), the last ones in a row. Likely causes: a learning rate too high "
        "(train.lr), fp16 overflow (model.dtype=bf16 or fp32), or bad rows in the data (lora-dpo data RECIPE). "
        f"{kept}"
    )


@contextlib.contextmanager
def out_of_memory_advice():
    """Turn a CUDA out-of-memory error into the recipe keys that reduce memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            "out of GPU memory. Reduce train.batch_size (raise train.grad_accum to keep the pairs per step), "
            "lower data.max_length / data.max_prompt_length, set model.gradient_checkpointing=true (every layer; "
            "auto plans for the memory free when the run starts), use model.quantization=nf4, or lower lora.r; "
            "`lora-dpo plan RECIPE --gpu-memory SIZE` proposes settings that fit"
        ) from None
