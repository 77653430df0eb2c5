"""Stops: the stop on request, and the stops a run makes itself: a streak of non-finite steps, and running out of
GPU memory, each turned into what the user can do about it.

A stop on request (SIGINT or SIGTERM) depends on where the run is. While it prepares (imports, data, model, the
reference pass, the baseline evaluation) nothing is trained and there is nothing to save, so it ends at once:
`StoppedEarly`, exit 130 and one line. Once the steps run, the first asks the loop to finish its optimizer step,
checkpoint and exit with code 130; a second stops at once. The command line handles both signals from its start
(`handle_stop_signals`), whatever the process inherited: a job a shell starts in the background inherits SIGINT
ignored, and would otherwise not hear the app's Stop until its model had loaded.

This module stays light (no torch at import): the command line imports it before anything heavy."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from ..errors import Interrupted, UserError

__all__ = ["EARLY_STOP", "Interrupted", "StopRequest", "StoppedEarly", "diverged", "handle_stop_signals",
           "out_of_memory_advice", "restore_signals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EARLY_STOP = "stopped before training began: nothing was trained, no checkpoint written; start again to train"


class StoppedEarly(KeyboardInterrupt):
    """A stop (SIGINT or SIGTERM) before the first training step: nothing to save, so the run ends at once and the
    command line exits 130 with `EARLY_STOP`. A KeyboardInterrupt, so that no library's `except Exception` around
    the code it lands in swallows it."""


# This process's stops, as the command line's handler saw them (reset by handle_stop_signals):
_began = False  # the run has begun its steps (StopRequest.training)
_pending: str | None = None  # a stop raised before the run's StopRequest: if a library swallowed the exception on
#                              its way up (a C or Rust extension that checks for signals and drops the error), the
#                              StopRequest raises it again


def _stop_early(signum, frame) -> None:
    global _pending
    if _began:  # outside the run's StopRequest after its steps began (the run is ending): stop at once
        raise KeyboardInterrupt
    _pending = signal.Signals(signum).name
    raise StoppedEarly(_pending)


def handle_stop_signals() -> dict:
    """Make SIGINT and SIGTERM raise `StoppedEarly` from now on, whatever this process inherited (SIG_IGN included:
    a background job of a shell starts with SIGINT ignored); `StopRequest` takes over when the run starts. Returns
    the inherited handlers, for `restore_signals`; {} off the main thread, where handlers cannot be set."""
    global _began, _pending
    if threading.current_thread() is not threading.main_thread():
        return {}
    _began, _pending = False, None
    return {sig: signal.signal(sig, _stop_early) for sig in SIGNALS}


def restore_signals(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python


class StopRequest:
    """Context manager for a whole run. While `training` is False (the run prepares) SIGINT/SIGTERM raise
    `StoppedEarly` at once; once the loop sets it, the first becomes a flag the loop polls between steps (finish
    the step, checkpoint, exit 130) and a second SIGINT raises KeyboardInterrupt (stop at once, no checkpoint); a
    SIGTERM after the first is ignored (launchers forward the user's Ctrl-C to their workers as SIGTERM)."""

    def __init__(self):
        self.requested: str | None = None
        self._training = False
        self._previous = {}

    @property
    def training(self) -> bool:
        """Set by the loop when its steps begin: from then on a stop has a checkpoint to write."""
        return self._training

    @training.setter
    def training(self, value: bool) -> None:
        global _began
        self._training = value
        _began = _began or value

    def __enter__(self) -> "StopRequest":
        if _pending and signal.getsignal(signal.SIGINT) is _stop_early:  # (only under the command line's handler)
            raise StoppedEarly(_pending)  # asked before, and the exception lost on its way up
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread (e.g. not inside an app)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore_signals(self._previous)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:  # preparing: nothing trained, nothing to save; waiting would only delay the stop
            self.requested = name  # (the loop checks it before the first step, should a library swallow the raise)
            raise StoppedEarly(name)
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            return  # a SIGTERM after a stop was asked is the launcher passing the user's Ctrl-C on (accelerate
            # launch, torchrun): the safe stop under way is what the user asked for
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
    except Exception as exc:
        torch = sys.modules.get("torch")  # the loop's, already loaded: this module itself stays light (see above)
        if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise UserError(
            "out of GPU memory. Reduce train.batch_size (raise train.grad_accum to keep the pairs per step), "
            "lower data.max_length / data.max_prompt_length, set model.gradient_checkpointing=true (every layer; "
            "auto plans for the memory free when the run starts), use model.quantization=nf4, or lower lora.r; "
            "`lora-dpo plan RECIPE --gpu-memory SIZE` proposes settings that fit"
        ) from None
