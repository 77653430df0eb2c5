"""`lora-dpo train` stopped while it prepares, as the app's Stop or a launcher stops it: whatever signal disposition
it inherited (a shell's background job starts with SIGINT ignored), it ends within seconds with exit code 130 and
one line, never a traceback, and writes no checkpoint."""

import signal
import subprocess
import sys

import pytest

EARLY = "lora-dpo: stopped before training began: nothing was trained, no checkpoint written; start again to train"


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `lora-dpo app &` leaves it to the trainer it starts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_trainer_that_inherited_sigint_ignored_stops_while_preparing_with_one_line(long_recipe, tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-m", "lora_dpo", "train", str(long_recipe)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "PYTHONUNBUFFERED": "1"})
    first = proc.stderr.readline()  # printed once the signals are handled, before torch is imported
    assert first.startswith("lora-dpo train: loading PyTorch"), first
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)  # a hang guard, not a speed bound
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == EARLY, err
    assert not (tmp_path / "run" / "checkpoints").exists()
