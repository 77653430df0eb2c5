"""What a terminal would show, written as lines where there is none: a log file, the app's captured output, CI.

A light module (no tqdm): the command line wraps every command in `lines_off_terminal()`, and progress.py draws
its own bars through `Lines`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Iterator

LOG_EVERY = 10.0  # seconds between the lines of a bar that is not on a terminal
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-HJKf]")  # cursor moves and erases: how tqdm redraws nested bars (ESC [A)


class Lines:
    """A stream that writes what a terminal would end up showing, as lines: text ended by a newline is a line; a
    bar redrawn in place (a carriage return, then the bar) becomes a line when it starts, then at most one every
    `every` seconds, and its last state when the bar ends. Anything else is passed to the wrapped stream."""

    def __init__(self, stream, every: float = 0.0):
        self.stream, self.every = stream, every
        self.pending, self.shown, self.last = "", "", -float("inf")
        self.fresh = True  # the next redraw starts a bar: shown at once

    def _emit(self, line: str) -> None:
        if line.strip() and line != self.shown:
            self.stream.write(line.rstrip() + "\n")
            self.shown, self.last = line, time.monotonic()
        self.pending = ""

    def write(self, text: str) -> int:
        n, text = len(text), _CURSOR.sub("", text)  # a log has no cursor to move
        parts = text.split("\n")
        for k, part in enumerate(parts):
            redrawn = "\r" in part
            self.pending = part.split("\r")[-1] if redrawn else self.pending + part  # what a terminal shows
            if k < len(parts) - 1:  # ended by a newline: a finished line, or the end of a bar
                self._emit(self.pending)
                self.fresh = True
            elif redrawn and (self.fresh or time.monotonic() - self.last >= self.every):
                self._emit(self.pending)
                self.fresh = False
        return n

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write what is still pending (a bar that never ended its line)."""
        self._emit(self.pending)
        self.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):  # fileno, encoding, ...: the wrapped stream's
        if name == "stream":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def lines_off_terminal() -> Iterator[None]:
    """Off a terminal, everything written to stderr meanwhile goes through `Lines` (a line per LOG_EVERY seconds
    of a library's bar, no carriage returns); on a terminal, nothing changes."""
    if on_terminal(sys.stderr):
        yield
        return
    lines = Lines(sys.stderr, every=LOG_EVERY)
    try:
        with contextlib.redirect_stderr(lines):
            yield
    finally:
        lines.close()
