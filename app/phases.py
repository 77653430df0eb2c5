"""The phases of a training run as the page shows them: the current one with its progress, then every phase so far
with its time. Pure HTML from what `lora_dpo.run.read_phases` reads in the run's progress.json; no gradio.

The ids and attributes are the page's interface to a browser test:

    <div id='phases' data-current='training'>
      <div id='phase-current' data-phase='training' data-state='running' data-done='12' data-total='30'>
        <b>training</b> 12/30 steps <progress max='30' value='12'></progress> · 42 s <span class='phase-detail'>..</span>
      </div>
      <ol id='phase-list'>
        <li data-phase='loading the model' data-state='done' data-seconds='3.2'>loading the model <span ..>3 s</span></li>
        <li data-phase='training' data-state='running' data-seconds='42.0'>training <span ..>42 s</span></li>
      </ol>
    </div>
"""

from __future__ import annotations

import math
from html import escape


def phases_html(phases: list[dict], now: float, *, live: bool = True) -> str:
    """`phases` as `read_phases` gives them (oldest first), `now` the unix time a running phase is measured to.
    The current phase is the innermost one still open (the last started that has not ended: an evaluation inside
    training); a finished phase shows its duration, an open one the time since it started; a phase that recurs
    (evaluation, saving a checkpoint) is one line with its count and its time in all. `live=False` (the job
    has ended): a phase still open was cut short by a failure or a stop, data-state 'stopped'."""
    current = None
    groups: dict[str, dict] = {}  # a phase that recurs (evaluation, saving a checkpoint) is one line: count, time
    for entry in phases:
        name = str(entry.get("name", ""))
        started, ended = _number(entry.get("started")), _number(entry.get("ended"))
        state = "done" if ended is not None else "running" if live else "stopped"
        seconds = max(0.0, (ended if ended is not None else now) - started) if started is not None else None
        if state != "done":
            current = (entry, seconds)
        group = groups.setdefault(name, {"count": 0, "seconds": None, "state": "done"})
        group["count"] += 1
        if seconds is not None:
            group["seconds"] = (group["seconds"] or 0.0) + seconds
        if state != "done":
            group["state"] = state
    items = []
    for name, g in groups.items():
        timed = "" if g["seconds"] is None else f" data-seconds='{g['seconds']:.1f}'"
        times = f" ×{g['count']}" if g["count"] > 1 else ""
        items.append(f"<li data-phase='{_attr(name)}' data-state='{g['state']}' data-count='{g['count']}'{timed}>"
                     f"{escape(name)}{times} <span class='phase-time'>{_duration(g['seconds'])}</span></li>")
    return (f"<div id='phases' data-current='{_attr(current[0].get('name', '')) if current else ''}'>"
            f"{_current(current, live, bool(phases))}<ol id='phase-list'>{''.join(items)}</ol></div>")


def _current(current: tuple[dict, float | None] | None, live: bool, started: bool) -> str:
    if current is None:
        state, text = (("done", "all phases done") if started else ("waiting", "starting the trainer") if live
                       else ("stopped", "the trainer ended before its first phase"))
        return f"<div id='phase-current' data-phase='' data-state='{state}'>{text}</div>"
    entry, seconds = current
    name, detail = str(entry.get("name", "")), entry.get("detail")
    done, total, unit = _number(entry.get("done")), _number(entry.get("total")), entry.get("unit")
    count = _count(done, total, unit) if done is not None and (total is not None or done) else ""  # (none yet: no 0)
    bar = (f" <progress max='{_num(total)}' value='{_num(min(done or 0, total))}'></progress>"
           if total and total > 0 else "")
    more = f" <span class='phase-detail'>{escape(str(detail))}</span>" if detail and detail != name else ""
    done_attr, total_attr = ("" if v is None else _num(v) for v in (done, total))
    return (f"<div id='phase-current' data-phase='{_attr(name)}' data-state='{'running' if live else 'stopped'}'"
            f" data-done='{done_attr}' data-total='{total_attr}'>"
            f"<b>{escape(name)}</b>{count}{bar} · {_duration(seconds)}{more}</div>")


def _count(done: float, total: float | None, unit) -> str:
    """' 12/30 steps', ' 12 steps' without a total, ' 12/30' for tqdm's unitless 'it'."""
    units = f" {_plural(str(unit))}" if unit and unit != "it" else ""
    return f" {_num(done)}/{_num(total)}{units}" if total is not None else f" {_num(done)}{units}"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _duration(seconds: float | None) -> str:
    """'<1 s', '42 s', '3 min 05 s', '1 h 02 min'; '' when unknown."""
    if seconds is None:
        return ""
    if seconds < 1:
        return "&lt;1 s"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s // 60 % 60:02d} min"


def _number(value) -> float | None:
    """A finite number from the file, else None (a reader of a file written by anyone takes nothing on trust)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _attr(text: str) -> str:
    return escape(text, quote=True)
