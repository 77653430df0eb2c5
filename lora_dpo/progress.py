"""Progress of every long phase: a bar on a terminal, and readable lines in a log file.

`progress(...)` is tqdm on stderr. On a terminal it draws its bar in place; anywhere else (a log file, the app's
captured output, CI) a bar redrawn with carriage returns would be one unreadable line, so there it prints a full
line when it starts, every LOG_EVERY seconds and at the end:

    reference pass:  40%|####      | 12/30 [00:10<00:15,  1.19batch/s]

The bars that libraries draw (datasets' map, transformers' weight loading) get the same treatment from
`terminal.lines_off_terminal()`, which the command line wraps every command in.

Only the main process of several (under `accelerate launch`) shows progress; `lora_dpo.training.distributed`
passes `disable` for the others.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm

from .terminal import LOG_EVERY, Lines, on_terminal


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             disable: bool = False, **kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand when it is None), on stderr: drawn in place on a
    terminal, a line every LOG_EVERY seconds elsewhere. `disable`: show nothing (not the main process)."""
    stream = sys.stderr
    if on_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream, dynamic_ncols=True,
                    **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=Lines(stream), ascii=True,
                ncols=100, mininterval=LOG_EVERY, maxinterval=LOG_EVERY, **kwargs)


def say(message: str, disable: bool = False) -> None:
    """One line for the user on stderr, above any bar being drawn."""
    if not disable:
        tqdm.write(message, file=sys.stderr)
