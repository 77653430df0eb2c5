"""The phases of a run as its trainer recorded them in progress.json (lora_dpo/progress.py writes it): building
the toy world, tokenising data, loading the model, reference pass, evaluating and sampling the reference,
training, evaluation, saving. A reader for anyone who shows a run while it goes on (the app)."""

from __future__ import annotations

import os

from ..progress import read_record
from .rundir import RunDir


def read_phases(run_dir: "RunDir | str | os.PathLike") -> list[dict]:
    """The run's phases, oldest first, each {name, started, ended, done, total, unit, detail} (unix seconds; `ended`
    None while it runs, `total` None when unknown); [] when the run has no progress.json yet, or an unreadable
    one."""
    return read_record(RunDir.of(run_dir).progress)
