"""One training job at a time, in its own process: `python -m lora_dpo train RECIPE KEY=VALUE ...`.

The app holds no training logic. It starts the CLI with an argument list (never a shell string), in its own
session so a crash or a Ctrl-C in the app's terminal does not reach it, sends SIGINT for a safe stop (the
trainer finishes the step, writes a checkpoint and exits 130), and reads what the run writes: the log,
metrics.jsonl and eval.json.
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


class TrainingJob:
    def __init__(self, command: list[str], run_dir: Path, cwd: Path, env: Optional[dict] = None):
        self.command, self.run_dir = command, run_dir
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
        self.stop_requested = False
        self.ended: Optional[float] = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> bool:
        """The trainer's safe stop: finish the optimizer step, checkpoint, exit 130. Sent once: a second
        SIGINT would make the trainer stop at once, without its checkpoint. False if already asked."""
        if not self.running() or self.stop_requested:
            return False
        self.stop_requested = True
        self.proc.send_signal(signal.SIGINT)
        return True

    def kill(self) -> None:
        if self.running():
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
                     remaining, rows, "\n".join(log.splitlines()[-40:]), returncode=code)
        if code is None:
            return p
        p.remaining_s = 0.0 if code == 0 else None
        if code == 0:
            p.state = "finished"
            run = RunDir(self.run_dir)
            p.final = json.loads(run.eval.read_text()) if run.eval.is_file() else None
        elif code == 130 and self.stop_requested:
            p.state = "stopped"
            p.checkpoint = self._new_checkpoint()
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

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Optional[TrainingJob] = None

    def start(self, command: list[str], run_dir: Path, cwd: Path, env: Optional[dict] = None) -> TrainingJob:
        with self._lock:
            if self.job is not None and self.job.running():
                raise UserError(f"a training job is already running ({self.job.run_dir}); stop it or wait for "
                                "it to finish before starting another")
            self.job = TrainingJob(command, run_dir, cwd, env)
            return self.job

    def stop(self) -> str:
        job = self.job
        if job is None or not job.running():
            return "no training job is running"
        if not job.stop():
            return "already stopping: the trainer is finishing its step and writing the checkpoint"
        return "stopping: the trainer finishes this step, saves a checkpoint, then exits"

    def shutdown(self, timeout: float = 60.0) -> None:
        """On app exit: ask the job to stop safely, wait a while, then kill it."""
        job = self.job
        if job is not None and job.running():
            job.stop()
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.kill()


def train_command(recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_dpo", "train", str(recipe), *overrides]
