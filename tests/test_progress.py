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


# -- the record of phases (progress.json in a run directory)

from lora_dpo import progress as phases  # noqa: E402
from lora_dpo.progress import progress, read_record, record_to, say, stop_recording  # noqa: E402


@pytest.fixture
def record(tmp_path):
    """A record kept in tmp_path/progress.json for the test, stopped after it."""
    path = tmp_path / "progress.json"
    record_to(path)
    yield path
    stop_recording()


def entries(path):
    return [(p["name"], p["done"], p["total"], p["unit"], p["detail"], p["ended"] is not None) for p in read_record(path)]


def test_without_a_record_bars_and_phases_leave_no_file(tmp_path):
    with phases.phase("training") as p:
        p.advance(3)
        for _ in progress(range(3), desc="evaluation", disable=False):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_bar_is_an_entry_and_a_bar_inside_a_phase_block_is_that_phases_progress(record):
    with phases.phase("reference pass"):
        for _ in progress(range(5), desc="reference pass (40 training pairs)", unit="batch"):
            assert entries(record)[-1][5] is False  # open while it runs
        for _ in progress(range(2), desc="reference pass (16 held-out pairs)", unit="batch"):
            pass
    bar = progress(total=10, initial=4, desc="dpo", unit="step", phase="training")  # a resumed run: from step 4
    assert entries(record)[-1] == ("training", 4, 10, "step", "dpo", False)
    for _ in range(6):
        bar.update(1)
    bar.close()
    for _ in progress(range(3), desc="toy world: pre-training the base", unit="step"):  # no phase name, no block
        pass
    assert entries(record) == [("reference pass", 2, 2, "batch", "reference pass (16 held-out pairs)", True),
                               ("training", 10, 10, "step", "dpo", True),
                               ("toy world: pre-training the base", 3, 3, "step", None, True)]


def test_a_phase_inside_a_bar_is_an_entry_of_its_own_and_a_said_line_is_its_detail(record):
    bar = progress(total=4, desc="dpo", unit="step", phase="training")
    bar.update(2)
    with phases.phase("evaluation"):
        say("notice: something the user should know")
        for _ in progress(range(3), desc="evaluation (12 held-out pairs)", unit="batch"):
            pass
    bar.update(2)
    bar.close()
    training, evaluation = read_record(record)
    assert (training["done"], evaluation["done"], evaluation["detail"]) == (4, 3, "evaluation (12 held-out pairs)")
    assert training["started"] <= evaluation["started"] <= evaluation["ended"] <= training["ended"]


def test_a_bars_steps_are_written_at_most_every_RECORD_EVERY_seconds_its_start_and_end_at_once(clock, record):
    bar = progress(total=100, desc="dpo", unit="step", phase="training")
    assert entries(record)[-1][1] == 0  # its start: at once
    for _ in range(10):
        bar.update(1)
    assert entries(record)[-1][1] == 0  # ten steps in no time: none written
    clock.now += phases.RECORD_EVERY
    bar.update(1)
    assert entries(record)[-1][1] == 11  # the interval has passed: written
    clock.now += phases.RECORD_EVERY / 2
    bar.update(1)
    assert entries(record)[-1][1] == 11
    bar.close()
    assert entries(record)[-1][1:] == (12, 100, "step", "dpo", True)  # its end: at once, with the last count


def test_entries_wait_in_memory_until_the_run_folder_exists(tmp_path):
    path = tmp_path / "run" / "progress.json"
    record_to(path)
    try:
        with phases.phase("tokenising data", total=64, unit="row") as p:
            p.advance(64)
        assert not (tmp_path / "run").exists()  # a recorder never makes the run directory
        (tmp_path / "run").mkdir()
        with phases.phase("loading the model"):
            pass
        assert [(n, done, ended) for n, done, _, _, _, ended in entries(path)] == [("tokenising data", 64, True),
                                                                                   ("loading the model", 0, True)]
    finally:
        stop_recording()


def test_a_fresh_record_replaces_the_file_and_a_kept_one_follows_it(tmp_path):
    path = tmp_path / "progress.json"
    record_to(path)
    with phases.phase("loading the model"):
        pass
    bar = progress(total=10, desc="dpo", unit="step", phase="training")
    bar.update(3)
    phases._RECORDER.stopped = True  # the process is killed: its last write is all that is left
    killed = read_record(path)
    record_to(path, keep=True)  # a resumed run
    with phases.phase("loading the model"):
        pass
    stop_recording()
    kept = read_record(path)
    assert [p["name"] for p in kept] == ["loading the model", "training", "loading the model"]
    assert kept[1]["ended"] is not None and kept[1]["ended"] >= killed[1]["started"]  # left open: ended when last written
    record_to(path)  # a fresh run in the same folder
    assert read_record(path) == []
    stop_recording()


def test_stop_recording_ends_the_phases_a_failure_left_open_and_records_nothing_after(record):
    bar = progress(total=10, desc="dpo", unit="step", phase="training")
    bar.update(2)
    stop_recording()
    assert entries(record) == [("training", 2, 10, "step", "dpo", True)]
    bar.update(5)
    bar.close()
    with phases.phase("evaluation"):
        pass
    assert entries(record) == [("training", 2, 10, "step", "dpo", True)]


def test_a_progress_file_that_cannot_be_written_costs_one_warning_never_the_run(record, capsys):
    record.unlink()
    (record.parent / ".progress.json.tmp").mkdir()  # the temporary file cannot be written
    for _ in progress(range(3), desc="reference pass", unit="batch"):
        with phases.phase("evaluation"):
            pass
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot write the progress file" in line]
    assert len(warnings) == 1 and not record.exists()


def test_only_the_process_that_set_the_record_writes_it(record):
    phases._RECORDER.pid = -1  # as a worker forked by datasets' map sees it
    with phases.phase("tokenising data"):
        for _ in progress(range(2), desc="map"):
            pass
    phases._RECORDER.pid = os.getpid()
    assert read_record(record) == []


def test_building_the_toy_world_is_a_phase_counted_in_pairs(record, monkeypatch, tmp_path):
    from lora_dpo.toy import cache  # noqa: PLC0415 - the toy world loads torch: only this test needs it

    monkeypatch.setattr(cache, "TRAIN_PAIRS", 12)
    monkeypatch.setattr(cache, "TEST_PAIRS", 4)
    (tmp_path / "toy").mkdir()
    cache._write_data(tmp_path / "toy")
    assert entries(record) == [("building the toy world", 16, 16, "pair", None, True)]
