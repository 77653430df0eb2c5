"""Stops on request (training/stopping.py), in this process: while the run prepares a stop ends it at once; once the
steps run, the first finishes the step and the second stops at once; the command line's handler works whatever
the process inherited, and a stop a library swallowed is raised again when the run starts."""

import json
import os
import signal
import time

import pytest
from filelock import FileLock

from lora_dpo.config import load_recipe
from lora_dpo.run import RunDir
from lora_dpo.training import loop
from lora_dpo.training.stopping import StopRequest, StoppedEarly, handle_stop_signals, restore_signals


def send(sig: signal.Signals) -> None:
    """Signal this process and give Python the moment it needs to run the handler (between two bytecodes)."""
    os.kill(os.getpid(), sig)
    for _ in range(100):
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_run_prepares_ends_it_at_once(sig):
    with pytest.raises(StoppedEarly), StopRequest():
        send(sig)
        pytest.fail("the stop did not end the preparation")


def test_once_training_the_first_stop_is_a_flag_and_the_second_stops_at_once():
    with StopRequest() as stop:
        stop.training = True
        send(signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # the loop finishes its step and checkpoints
        send(signal.SIGTERM)  # a launcher passing the user's Ctrl-C on as SIGTERM: the safe stop goes on
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt) as raised:
            send(signal.SIGINT)
        assert not isinstance(raised.value, StoppedEarly)  # "at once", not "before training began"


def test_the_command_lines_handler_hears_sigint_even_when_it_was_inherited_ignored():
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a job it starts in the background
    try:
        handlers = handle_stop_signals()
        with pytest.raises(StoppedEarly):
            send(signal.SIGINT)
        restore_signals(handlers)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # what was inherited comes back
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_stop_a_library_swallowed_is_raised_again_when_the_run_starts():
    handlers = handle_stop_signals()
    try:
        try:
            send(signal.SIGINT)
        except StoppedEarly:
            pass  # as a library that catches everything would
        with pytest.raises(StoppedEarly), StopRequest():
            pytest.fail("the run started after a stop")
    finally:
        restore_signals(handlers)
    with StopRequest():  # once the command line's handler is gone, what it saw stays with it
        pass


def test_a_stop_during_the_reference_pass_ends_the_run_before_any_step(tmp_path, tiny_llama, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"})
                              for i in range(8)))
    keys = [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_llama}", f"data.train={data}", "data.max_length=24",
            "train.max_steps=2", "train.batch_size=2"]
    reference_tables = loop.reference_tables

    def stopped_midway(*args, **kwargs):
        send(signal.SIGINT)
        return reference_tables(*args, **kwargs)

    monkeypatch.setattr(loop, "reference_tables", stopped_midway)
    with pytest.raises(StoppedEarly):
        loop.train(load_recipe(None, keys))
    run = RunDir(tmp_path / "run")
    assert not run.checkpoints.exists() and not run.adapter.exists()
    FileLock(str(run.lock_file)).acquire(timeout=0)  # the run let its folder go
