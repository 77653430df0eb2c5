"""Progress of every long phase: a bar on a terminal, and readable lines in a log file.

`progress(...)` is tqdm on stderr. On a terminal it draws its bar in place; anywhere else (a log file, the app's
captured output, CI) a bar redrawn with carriage returns would be one unreadable line, so there it prints a full
line every LOG_EVERY seconds and at the end:

    reference pass:  40%|####      | 12/30 [00:10<00:15,  1.19batch/s]

Only the main process of several (under `accelerate launch`) shows progress; `lora_dpo.training.distributed`
passes `disable` for the others.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm

LOG_EVERY = 10.0  # seconds between the lines of a bar that is not on a terminal


class _Lines:
    """A file for tqdm that turns each redraw (a carriage return, then the bar) into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             disable: bool = False, **kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand when it is None), on stderr: drawn in place on a
    terminal, a line every LOG_EVERY seconds elsewhere. `disable`: show nothing (not the main process)."""
    stream = sys.stderr
    if on_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream, dynamic_ncols=True,
                    **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=_Lines(stream), ascii=True,
                ncols=100, mininterval=LOG_EVERY, maxinterval=LOG_EVERY, **kwargs)


def say(message: str, disable: bool = False) -> None:
    """One line for the user on stderr, above any bar being drawn."""
    if not disable:
        tqdm.write(message, file=sys.stderr)
