"""Every long phase shows progress: a bar drawn in place on a terminal; elsewhere (a log file, the app's captured
output) readable lines with no carriage returns, at most one per LOG_EVERY seconds of a bar, libraries' bars
included."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dpo import terminal
from lora_dpo.terminal import Lines


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(terminal.time, "monotonic", clock)
    return clock


def test_a_redrawn_bar_becomes_a_line_at_its_start_every_interval_and_at_its_end(clock):
    out = io.StringIO()
    lines = Lines(out, every=10)
    for k in range(100):  # one redraw a second, as tqdm writes them: "\r" + the bar, then "\n" when it closes
        clock.now = float(k)
        lines.write(f"\rmap: {k}%")
    lines.write("\rmap: 100%")
    lines.write("\n")
    assert out.getvalue().splitlines() == ["map: 0%", *[f"map: {k}%" for k in range(10, 100, 10)], "map: 100%"]
    assert "\r" not in out.getvalue()


def test_plain_lines_pass_at_once_and_text_split_across_writes_stays_one_line(clock):
    out = io.StringIO()
    lines = Lines(out, every=10)
    lines.write("\rbar 5%")
    lines.write("warning: something\n")  # a message printed while a bar is open: a line of its own
    lines.write("data: ")
    lines.write("300 rows\n")
    lines.write("\rlast bar 6%")  # a new bar: its first state is shown at once
    lines.write("\rlast bar 7%")
    lines.close()  # a bar left open: its last state is written
    assert out.getvalue().splitlines() == ["bar 5%", "warning: something", "data: 300 rows", "last bar 6%",
                                             "last bar 7%"]


def test_a_nested_bar_leaves_no_cursor_moves_in_a_log(clock):
    out = io.StringIO()
    lines = Lines(out, every=10)
    lines.write("\rdpo: 50%")
    lines.write("\n\reval: 100%\x1b[A")  # tqdm: the inner bar on the next row, then the cursor back up to the outer
    lines.write("\rdpo: 51%")
    lines.close()
    assert "\x1b" not in out.getvalue() and out.getvalue().splitlines() == ["dpo: 50%", "eval: 100%", "dpo: 51%"]


def test_lines_off_terminal_leaves_a_terminal_alone(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stderr", Tty())
    with terminal.lines_off_terminal():
        assert isinstance(sys.stderr, Tty)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with terminal.lines_off_terminal():
        assert isinstance(sys.stderr, Lines)


def test_a_short_toy_run_logged_to_a_file_shows_every_phase_in_lines(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        code = subprocess.run([Path(sys.executable).parent / "lora-dpo", "train", "toy", "train.max_steps=5",
                               "eval.num_prompts=16"], stdout=out, stderr=out, cwd=tmp_path, timeout=900,
                              env={**os.environ, "TERM": "xterm", "LORA_DPO_CACHE": str(tmp_path / "cache")}).returncode
    text = log.read_bytes().decode()  # bytes: a text read would turn carriage returns into newlines
    assert code == 0, text[-3000:]
    assert "\r" not in text
    for phase in ("tokenising", "Loading weights", "reference pass (", "evaluation (", "sampling 16 replies of the "
                  "reference model", "dpo:", "sampling 16 replies of the policy"):
        assert any(line.startswith(phase) and "100%" in line for line in text.splitlines()), phase
