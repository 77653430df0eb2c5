"""Progress of every long phase: a bar on a terminal, and readable lines in a log file.

`progress(...)` is tqdm on stderr. On a terminal it draws its bar in place; anywhere else (a log file, the app's
captured output, CI) a bar redrawn with carriage returns would be one unreadable line, so there it prints a full
line when it starts, every LOG_EVERY seconds and at the end:

    reference pass:  40%|####      | 12/30 [00:10<00:15,  1.19batch/s]

The bars that libraries draw (datasets' map, transformers' weight loading) get the same treatment from
`terminal.lines_off_terminal()`, which the command line wraps every command in.

Only the main process of several (under `accelerate launch`) shows progress; `lora_dpo.training.distributed`
passes `disable` for the others.

The same phases go, as data, into a file that anyone can read while the run goes on (the app shows them): the
trainer sets that file once per run with `record_to(path)` (its run directory's progress.json), and from then on
every bar and every `phase(name)` block of this process is an entry of it:

    {"updated": 1718000012.5, "phases": [
      {"name": "loading the model", "started": 1718000001.2, "ended": 1718000003.9, "done": 0, "total": null,
       "unit": null, "detail": null},
      {"name": "training", "started": 1718000009.0, "ended": null, "done": 12, "total": 30, "unit": "step",
       "detail": "dpo"}]}

A bar opened inside a `phase` block (with no phase name of its own) is that phase's progress, not an entry of
its own: "reference pass" shows the batches of each of its tables in turn, `detail` naming the table. Times are
unix seconds; `ended` is null while a phase runs. The file is replaced atomically (a temporary file renamed), at
most every RECORD_EVERY seconds for a bar's steps and at once for a phase's start and end; it is written only once
its folder exists (entries before that wait in memory), and a write that fails costs a warning, never the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tqdm.auto import tqdm

from .terminal import LOG_EVERY, Lines, on_terminal


RECORD_EVERY = 0.25  # seconds: at most four writes a second of the progress file for a bar's steps


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             disable: bool = False, phase: Optional[str] = None, **kwargs) -> tqdm:
    """A progress bar over `iterable` (or updated by hand when it is None), on stderr: drawn in place on a
    terminal, a line every LOG_EVERY seconds elsewhere. `disable`: show nothing (not the main process).

    When phases are recorded (`record_to`), the bar is an entry of the record named `phase` (`desc` then says
    more), or by its `desc` when it has no phase name; or, without a phase name inside a `phase(...)` block, that
    phase's progress."""
    stream = sys.stderr
    if on_terminal(stream):
        bar = _Bar(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream, dynamic_ncols=True,
                   **kwargs)
    else:
        bar = _Bar(iterable, desc=desc, total=total, unit=unit, disable=disable, file=Lines(stream), ascii=True,
                   ncols=100, mininterval=LOG_EVERY, maxinterval=LOG_EVERY, **kwargs)
    if not disable and (rec := _recorder()) is not None:
        bar.record(rec, phase, desc)
    return bar


def say(message: str, disable: bool = False) -> None:
    """One line for the user on stderr, above any bar being drawn (and the `detail` of the phase it is said in,
    when phases are recorded)."""
    if not disable:
        tqdm.write(message, file=sys.stderr)
        if (rec := _recorder()) is not None:
            rec.note(message)


@contextlib.contextmanager
def phase(name: str, *, total: Optional[int] = None, unit: Optional[str] = None,
          detail: Optional[str] = None) -> Iterator["_Phase"]:
    """A named phase of the run for the duration of the block: an entry of the record when phases are recorded
    (nothing otherwise). Bars opened inside it without a phase name of their own are its progress; `advance(n)`
    on what it yields moves it by hand."""
    rec = _recorder()
    if rec is None:
        yield _Phase(None, name, total, unit, detail)
        return
    entry = rec.begin(name, total, unit, detail, container=True)
    try:
        yield entry
    finally:
        entry.end()


def record_to(path: "str | os.PathLike", *, keep: bool = False) -> None:
    """From now on, record this process's phases in the progress file `path` (the trainer: its run's progress.json,
    on the main process only), written at once: after the phases it holds when `keep` (a resumed run: those
    a killed run left open end when it last wrote), else in place of them."""
    global _RECORDER
    if _RECORDER is not None:
        _RECORDER.stopped = True
    phases = []
    if keep:
        record = _read(Path(path))
        phases = record["phases"]
        for entry in phases:
            if entry.get("ended") is None:
                entry["ended"] = record["updated"] or entry["started"]
    _RECORDER = _Recorder(Path(path), phases)
    _RECORDER.save(force=True)


def stop_recording() -> None:
    """The run is over: phases still open (a run that failed or stopped inside them) end now, the file is written a
    last time, and nothing more is recorded."""
    global _RECORDER
    rec, _RECORDER = _RECORDER, None
    if rec is not None and rec.pid == os.getpid():
        with rec.lock:
            for entry in list(rec.open):
                entry.end()
            rec.save(force=True)
            rec.stopped = True


def read_record(path: "str | os.PathLike") -> list[dict]:
    """The phases of a progress file, oldest first: [] when it is missing, half-written or something else."""
    return _read(Path(path))["phases"]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"updated": None, "phases": []}
    data = data if isinstance(data, dict) else {}
    phases = data.get("phases") if isinstance(data.get("phases"), list) else []
    updated = data.get("updated") if isinstance(data.get("updated"), (int, float)) else None
    return {"updated": updated, "phases": [p for p in phases if isinstance(p, dict) and isinstance(p.get("name"), str)
                                           and isinstance(p.get("started"), (int, float))]}


def _count(value):
    """A count as JSON holds it: an int when it is whole, None when unknown or infinite."""
    if value is None or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else float(value)


_RECORDER: Optional["_Recorder"] = None  # the process-wide sink of phases (record_to), None when none is kept


def _recorder() -> Optional["_Recorder"]:
    rec = _RECORDER
    # a forked worker (datasets' map with num_proc) inherits the sink, but only the process that set it records
    return rec if rec is not None and rec.pid == os.getpid() else None


class _Recorder:
    """The phases of this run so far, and the file they are written to."""

    def __init__(self, path: Path, phases: list[dict]):
        self.path, self.phases, self.pid = path, phases, os.getpid()
        self.open: list[_Phase] = []  # started and not ended, oldest first
        self.lock = threading.RLock()
        self.written = -math.inf  # time.monotonic() of the last write
        self.stopped = self.warned = False

    def begin(self, name: str, total, unit, detail, container: bool = False, done=0) -> "_Phase":
        entry = _Phase(self, name, total, unit, detail, container, done)
        with self.lock:
            self.phases.append(entry.entry)
            self.open.append(entry)
        self.save(force=True)
        return entry

    def inside(self) -> Optional["_Phase"]:
        """The phase a bar with no phase name drives: the innermost open one, when it is a `phase(...)` block."""
        with self.lock:
            return self.open[-1] if self.open and self.open[-1].container else None

    def note(self, message: str) -> None:
        with self.lock:
            if self.open:
                self.open[-1].entry["detail"] = message
        self.save(force=True)

    def save(self, force: bool) -> None:
        """Write the record (at once when `force`, else at most every RECORD_EVERY seconds), atomically: a reader
        sees the last file or the next one, never half of one. Nothing before the run's folder exists."""
        now = time.monotonic()
        with self.lock:
            if self.stopped or (not force and now - self.written < RECORD_EVERY) or not self.path.parent.is_dir():
                return
            self.written = now
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                tmp.write_text(json.dumps({"updated": time.time(), "phases": self.phases}), encoding="utf-8")
                os.replace(tmp, self.path)
            except Exception as exc:  # noqa: BLE001 - a progress file that cannot be written must not end a run
                if not self.warned:
                    self.warned = True
                    tqdm.write(f"warning: cannot write the progress file {self.path} ({exc}); training goes on",
                               file=sys.stderr)


class _Phase:
    """One entry of the record and what moves it (a phase that is not recorded when it has no recorder)."""

    def __init__(self, recorder: Optional[_Recorder], name: str, total=None, unit=None, detail=None,
                 container: bool = False, done=0):
        self.recorder, self.container = recorder, container
        self.entry = {"name": name, "started": time.time(), "ended": None, "done": _count(done),
                      "total": _count(total), "unit": unit, "detail": detail}

    def advance(self, n: float = 1) -> None:
        self.at(self.entry["done"] + n)

    def at(self, done: float) -> None:
        if self.recorder is None or self.entry["done"] == done:
            return
        with self.recorder.lock:
            self.entry["done"] = _count(done)
        self.recorder.save(force=False)

    def show(self, total, done, unit: str, detail: str) -> None:
        """A bar starts inside this phase: its progress is the phase's from now on."""
        with self.recorder.lock:
            self.entry.update(total=_count(total), done=_count(done), unit=unit, detail=detail)
        self.recorder.save(force=True)

    def end(self) -> None:
        if self.recorder is None:
            return
        with self.recorder.lock:
            if self.entry["ended"] is not None:
                return
            self.entry["ended"] = time.time()
            if self in self.recorder.open:
                self.recorder.open.remove(self)
        self.recorder.save(force=True)


class _Bar(tqdm):
    """tqdm that moves its entry of the record (or the phase it runs inside) as it goes."""

    _phase: Optional[_Phase] = None  # (class defaults: a bar that is not recorded)
    _own = False

    def record(self, rec: _Recorder, name: Optional[str], desc: str) -> None:
        inside = None if name else rec.inside()
        if inside is not None:
            inside.show(self.total, self.n, self.unit, desc)
            self._phase = inside
        else:
            self._phase = rec.begin(name or desc, self.total, self.unit, desc if name else None, done=self.n)
            self._own = True

    def __iter__(self):
        entry = self._phase
        if entry is None:
            yield from super().__iter__()
            return
        done = self.n  # tqdm counts in a local of its own and updates self.n only when it redraws
        for obj in super().__iter__():
            yield obj
            done += 1
            entry.at(done)

    def update(self, n=1):
        shown = super().update(n)
        if self._phase is not None:
            self._phase.at(self.n)
        return shown

    def close(self):
        super().close()
        entry, self._phase = self._phase, None
        if entry is not None:
            entry.at(self.n)
            if self._own:
                entry.end()
