"""Safe stops: the first SIGINT or SIGTERM asks the loop to finish its optimizer step, checkpoint and exit
with code 130; a second SIGINT stops at once."""

from __future__ import annotations

import signal
import sys
import threading


class Interrupted(Exception):
    """The run stopped on request after saving a checkpoint; the CLI exits 130."""


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
