"""One training job at a time, in its own process: `python -m lora_dpo train RECIPE KEY=VALUE ...`.

The app holds no training logic. It starts the CLI with an argument list (never a shell string), in its own
session so a crash or a Ctrl-C in the app's terminal does not reach it, and reads what the run writes: the log,
metrics.jsonl and eval.json.

Stop escalates, so that it always stops. First a SIGINT: the trainer's safe stop (it finishes the step, writes a
checkpoint and exits 130; while it prepares, before any step, it ends at once). If the trainer then shows no sign
of life (its log, metrics or progress.json written) for a grace period, a second SIGINT: the trainer's stop at once
(no checkpoint of the step in flight); a long evaluation or checkpoint still writing is waited for. A grace period
after that, SIGKILL to its process group. A timer thread escalates whether or not the page is open; Stop clicked
again escalates at once (a click within DOUBLE_CLICK_S of the last counts as the same click).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora_dpo.errors import UserError
from lora_dpo.run import STATE_FILE, RunDir, complete_checkpoints, read_metrics

LOG_NAME = "app-train.log"  # beside the run's own files; appended to, never replaced
STOP_GRACE_S = 60.0  # seconds the trainer has to answer one level of Stop before the next is sent
DOUBLE_CLICK_S = 3.0  # a second click this soon after a Stop is the same click (an accidental double click)
STOP_KINDS = ("safe", "at once", "killed")  # the levels of Stop, in the order they are sent
STOPPED_CODES = (130, -signal.SIGINT, -signal.SIGTERM)  # a trainer that stopped on request (130: its own exit)


@dataclass
class Progress:
    state: str  # starting | running | finished | stopped | failed
    step: int = 0
    total: Optional[int] = None
    elapsed_s: float = 0.0
    remaining_s: Optional[float] = None
    rows: list[dict] = field(default_factory=list)  # this job's metrics.jsonl rows
    log_tail: str = ""
    final: Optional[dict] = None  # eval.json of a finished run
    error: Optional[str] = None  # the CLI's error message of a failed run
    checkpoint: Optional[str] = None  # the checkpoint a stopped run wrote (step-N), None if it stopped before one
    returncode: Optional[int] = None
    stop_kind: Optional[str] = None  # the last Stop sent: safe | at once | killed (STOP_KINDS); None: none sent
    stop_by: Optional[str] = None  # what sent it: "click", or "grace" (the trainer did not answer in time)
    stop_grace_s: float = STOP_GRACE_S  # the time it had to answer each level
    next_stop_in_s: Optional[float] = None  # while it runs: seconds until the next level is sent, if one is due
    newest_checkpoint: Optional[str] = None  # once stopped: the run's newest complete checkpoint, of any job


class TrainingJob:
    def __init__(self, command: list[str], run_dir: Path, cwd: Path, env: Optional[dict] = None,
                 grace_s: float = STOP_GRACE_S, double_click_s: float = DOUBLE_CLICK_S):
        self.command, self.run_dir = command, run_dir
        self.grace_s, self.double_click_s = grace_s, double_click_s
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / LOG_NAME
        self.started = time.time()
        self._seen: list[tuple[float, int]] = []  # (time, step) when a new step was first seen
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        self._offset = self.log_path.stat().st_size
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env.pop("LORA_DPO_APP_AUTH", None)  # the app's login is not the trainer's business
        try:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the handle
                self.proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True, env=child_env)
        except OSError as exc:
            raise UserError(f"cannot start {command[0]}: {exc}") from None
        self.stop_kind: Optional[str] = None  # the last level of Stop sent (STOP_KINDS)
        self.stop_by: Optional[str] = None  # "click" or "grace"
        self._stop_sent = 0.0  # time.monotonic() when it was sent
        self._stop_sent_at = 0.0  # the same, as unix time (to compare with file times)
        self._stop_lock = threading.Lock()  # a click and the escalation timer, one at a time
        self.ended: Optional[float] = None

    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def recipe(self) -> str:
        """The recipe the job trains, as given to `lora-dpo train` (relative to the workspace root)."""
        return self.command[4]

    @property
    def overrides(self) -> list[str]:
        return self.command[5:]

    @property
    def stop_requested(self) -> bool:
        return self.stop_kind is not None

    def stop(self, by: str = "click", unanswered: Optional[str] = None) -> Optional[str]:
        """Send the next level of Stop (STOP_KINDS): the safe stop first; the trainer's stop at once; SIGKILL to its
        process group. Returns the level sent, or None: not running, already killed, or a click within
        `double_click_s` of the last Stop (the same click twice; a second SIGINT would lose the checkpoint). After
        the first, a timer sends the next level whenever the trainer has not ended `grace_s` after the last
        (`unanswered`: the level the timer saw go unanswered; nothing is sent if a click has moved on meanwhile)."""
        with self._stop_lock:
            if not self.running() or self.stop_kind == "killed":
                return None
            if by == "click" and self.stop_kind and time.monotonic() - self._stop_sent < self.double_click_s:
                return None
            if unanswered and (self.stop_kind != unanswered or time.time() < self._deadline()):
                return None
            kind = STOP_KINDS[STOP_KINDS.index(self.stop_kind) + 1] if self.stop_kind else "safe"
            first = self.stop_kind is None
            self.stop_kind, self.stop_by, self._stop_sent = kind, by, time.monotonic()
            self._stop_sent_at = time.time()
            if kind == "killed":
                self.kill()
            else:
                self.proc.send_signal(signal.SIGINT)  # the trainer's own stop: safe the first time, at once the second
        if first:
            threading.Thread(target=self._escalate, name="stop-escalation", daemon=True).start()
        return kind

    def _escalate(self) -> None:
        """The timer: the next level of Stop whenever the last one went unanswered for `grace_s`."""
        while self.running() and self.stop_kind != "killed":
            kind, due = self.stop_kind, self._deadline() - time.time()
            if due <= 0:
                self.stop(by="grace", unanswered=kind)  # (checked again under the lock: a click may have come)
            else:
                time.sleep(min(due, 0.2))

    def next_stop_in(self) -> Optional[float]:
        """Seconds until the timer sends the next level of Stop; None when none is due."""
        if self.stop_kind in (None, "killed") or not self.running():
            return None
        return max(0.0, self._deadline() - time.time())

    def _deadline(self) -> float:
        """When the timer sends the next level (unix time): `grace_s` after the last level was sent; for the safe
        stop, `grace_s` after the trainer's last sign of life (its log, metrics or progress.json written), so a long
        evaluation or checkpoint still under way is waited for, and only a trainer that has gone silent is hurried."""
        start = self._stop_sent_at
        if self.stop_kind == "safe":
            run = RunDir(self.run_dir)
            for path in (self.log_path, run.metrics, run.progress):
                try:
                    start = max(start, path.stat().st_mtime)
                except OSError:
                    pass
        return start + self.grace_s

    def kill(self) -> None:
        if self.running():
            self.stop_kind = "killed"
            os.killpg(self.proc.pid, signal.SIGKILL)  # the trainer and anything it started (its own session)
            self.proc.wait()

    def progress(self) -> Progress:
        code = self.proc.poll()
        if code is not None and self.ended is None:
            self.ended = time.time()
        rows = self._rows()
        train_rows = [r for r in rows if r.get("split") == "train"]
        step = max((int(r["step"]) for r in train_rows), default=0)
        now = time.time()
        if step and (not self._seen or self._seen[-1][1] != step):
            self._seen.append((now, step))
        total = self._total_steps()
        remaining = None
        if total and len(self._seen) >= 2 and self._seen[-1][1] > self._seen[0][1]:
            (t0, s0), (t1, s1) = self._seen[0], self._seen[-1]
            remaining = max(0.0, (total - step) * (t1 - t0) / (s1 - s0))
        log = self._log_text()
        p = Progress("starting" if code is None and not rows else "running", step, total,
                     (self.ended or now) - self.started,
                     remaining, rows, "\n".join(log.splitlines()[-40:]), returncode=code,
                     stop_kind=self.stop_kind, stop_by=self.stop_by, stop_grace_s=self.grace_s,
                     next_stop_in_s=self.next_stop_in())
        if code is None:
            return p
        p.remaining_s = 0.0 if code == 0 else None
        if code == 0:
            p.state = "finished"
            run = RunDir(self.run_dir)
            p.final = json.loads(run.eval.read_text()) if run.eval.is_file() else None
        elif self.stop_requested and (code in STOPPED_CODES or self.stop_kind == "killed" and code == -signal.SIGKILL):
            p.state = "stopped"  # on request: early (nothing to save), safely (a checkpoint), at once, or killed
            p.checkpoint = self._new_checkpoint()
            done = complete_checkpoints(self.run_dir)
            p.newest_checkpoint = done[-1].name if done else None
        else:
            p.state = "failed"
            errors = [line for line in log.splitlines() if line.startswith("lora-dpo: error:")]
            if errors:
                p.error = errors[-1]
            elif code < 0:
                p.error = (f"killed by signal {-code} ({signal.Signals(-code).name}; out of memory?); "
                           "see the log")
            else:
                p.error = f"exit code {code}; see the log"
        return p

    def _new_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint this job wrote, if any (a stop while preparing writes none)."""
        written = [c for c in complete_checkpoints(self.run_dir) if self._fresh(c / STATE_FILE)]
        return written[-1].name if written else None

    def _fresh(self, path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime >= self.started - 1

    def _rows(self) -> list[dict]:
        path = RunDir(self.run_dir).metrics
        return read_metrics(path) if self._fresh(path) else []  # an older run's rows until the trainer starts

    def _total_steps(self) -> Optional[int]:
        info = RunDir(self.run_dir).run_info
        if self._fresh(info):
            try:
                return json.loads(info.read_text()).get("total_steps")
            except ValueError:
                return None
        return None

    def _log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(max(self._offset, self.log_path.stat().st_size - 200_000))  # the tail only, every second
            # tqdm redraws its bar with carriage returns: keep the last state of each line
            text = f.read().decode("utf-8", "replace")
        return "\n".join(line.split("\r")[-1] for line in text.split("\n"))


class JobManager:
    """The app's one job slot: a second start while a job runs is refused."""

    def __init__(self, grace_s: float = STOP_GRACE_S, double_click_s: float = DOUBLE_CLICK_S):
        self._lock = threading.Lock()
        self.job: Optional[TrainingJob] = None
        self.grace_s, self.double_click_s = grace_s, double_click_s  # for every job it starts (TrainingJob.stop)

    def start(self, command: list[str], run_dir: Path, cwd: Path, env: Optional[dict] = None) -> TrainingJob:
        with self._lock:
            if self.job is not None and self.job.running():
                raise UserError(f"a training job is already running ({self.job.run_dir}); stop it or wait for "
                                "it to finish before starting another")
            self.job = TrainingJob(command, run_dir, cwd, env, self.grace_s, self.double_click_s)
            return self.job

    def stop(self) -> str:
        """One click of Stop: the next level (TrainingJob.stop), and what happens next, in words."""
        job = self.job
        if job is None or not job.running():
            return "no training job is running"
        kind, grace = job.stop(), f"{job.grace_s:g} s"
        if kind == "safe":
            return (f"stopping safely: the trainer finishes this step, saves a checkpoint, then exits (while it "
                    f"prepares, it ends at once); if it has not stopped in {grace} it is stopped at once; "
                    "click Stop again to stop at once now")
        if kind == "at once":
            return (f"stopping at once: the step in flight is not saved (the newest checkpoint is kept); if the "
                    f"trainer has not stopped in {grace} it is killed; click Stop again to kill it now")
        if kind == "killed":
            return "killed the trainer and what it started: the step in flight is not saved"
        if not job.running():  # it ended between the check above and the signal
            return "no training job is running"
        if job.stop_kind == "killed":
            return "already killed: the trainer is ending"
        return (f"already stopping {'safely' if job.stop_kind == 'safe' else 'at once'} (that click came within "
                f"{job.double_click_s:g} s of the last); click Stop again to "
                f"{'stop at once' if job.stop_kind == 'safe' else 'kill it'} now")

    def shutdown(self, timeout: float = 60.0) -> None:
        """On app exit: ask the job to stop safely (unless a Stop is under way: it escalates on its own), wait a
        while, then kill it."""
        job = self.job
        if job is not None and job.running():
            if not job.stop_requested:
                job.stop(by="app exit")
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.kill()


def train_command(recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_dpo", "train", str(recipe), *overrides]
