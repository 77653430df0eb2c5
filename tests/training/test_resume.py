"""Training you can trust: exact resume after SIGKILL, safe stops, incomplete checkpoints, non-finite guards."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lora_dpo.methods import PreferenceMethod
from lora_dpo.run.checkpoint import complete_checkpoints
from lora_dpo.config import load_recipe
from lora_dpo.errors import ConfigError, UserError
from lora_dpo.run.metrics import read_metrics
from lora_dpo.training.loop import train

TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_gb")


@pytest.fixture
def recipe_path(tmp_path, tiny_qwen2):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
                                          "rejected": f"no it is bad {i % 5}"}) for i in range(30)))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
output_dir: {tmp_path / 'run'}
model: {{name: {tiny_qwen2}}}
lora: {{r: 4, dropout: 0.1}}          # dropout: the RNG state must resume too
data: {{train: {data}, max_length: 32, eval_fraction: 0.2}}
train: {{batch_size: 2, grad_accum: 2, lr: 5.0e-3, epochs: 2, warmup_ratio: 0.2, eval_every: 4, save_every: 2, keep_last: 3}}
eval: {{batch_size: 4}}
""")
    return path


def rows_without_timing(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir / "metrics.jsonl")]


def uninterrupted(recipe_path, tmp_path):
    out = tmp_path / "whole"
    train(load_recipe(recipe_path, [f"output_dir={out}"]))
    return rows_without_timing(out)


def start_cli(recipe_path, *overrides):
    return subprocess.Popen([sys.executable, "-m", "lora_dpo", "train", str(recipe_path), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, proc, step, timeout=240):
    """Block until metrics.jsonl has a train row at `step` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(path)):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    raise TimeoutError(step)


def test_run_killed_with_sigkill_at_several_points_resumes_to_the_same_metrics(recipe_path, tmp_path):
    expected = uninterrupted(recipe_path, tmp_path)
    assert len([r for r in expected if r["split"] == "train"]) == 12  # 24 pairs / (2 x 2) x 2 epochs
    run_dir = tmp_path / "run"
    for kill_after in (3, 7, 10):  # between checkpoints, right after an eval step, in the second epoch
        proc = start_cli(recipe_path, "resume=true")
        wait_for_step(run_dir, proc, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    train(load_recipe(recipe_path, ["resume=true"]))
    assert rows_without_timing(run_dir) == expected  # every loss, reward, lr and grad norm to the last digit
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 12


def test_sigint_saves_a_checkpoint_exits_130_and_resumes_exactly(recipe_path, tmp_path):
    expected = uninterrupted(recipe_path, tmp_path)
    run_dir = tmp_path / "run"
    proc = start_cli(recipe_path)
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with" in err and "Traceback" not in err
    stopped_at = max(int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir))
    assert stopped_at >= 3  # the step in flight was finished and saved, not lost
    assert not (run_dir / "adapter").exists()  # no final adapter from a stopped run
    train(load_recipe(recipe_path, ["resume=true"]))
    assert rows_without_timing(run_dir) == expected


def test_sigterm_also_stops_safely(recipe_path, tmp_path):
    proc = start_cli(recipe_path)
    wait_for_step(tmp_path / "run", proc, 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert complete_checkpoints(tmp_path / "run")


def test_incomplete_checkpoints_are_skipped_on_resume(recipe_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(load_recipe(recipe_path, ["train.max_steps=4"]))
    newest = complete_checkpoints(run_dir)[-1]
    assert newest.name == "step-4"
    # what a kill during a save leaves: a temporary folder, and a step folder without its state file
    shutil.copytree(newest, run_dir / "checkpoints" / ".step-6.tmp")
    shutil.copytree(newest / "adapter", run_dir / "checkpoints" / "step-8" / "adapter")
    train(load_recipe(recipe_path, ["train.max_steps=6", "resume=true"]))
    err = capsys.readouterr().err
    assert "skipping incomplete checkpoint" in err and "step-8" in err
    assert "resuming from" in err and "step-4" in err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_keep_last_bounds_the_checkpoints_on_disk(recipe_path, tmp_path):
    train(load_recipe(recipe_path, ["train.max_steps=6", "train.save_every=1", "train.keep_last=2"]))
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-5", "step-6"]


def test_resume_refuses_a_recipe_that_trains_differently(recipe_path, tmp_path):
    train(load_recipe(recipe_path, ["train.max_steps=2"]))
    with pytest.raises(ConfigError, match=r"differs .* in loss.beta, train.lr"):
        train(load_recipe(recipe_path, ["resume=true", "train.lr=1e-3", "loss.beta=0.3",
                                        "model.gradient_checkpointing=true"]))  # (not named: it changes no value)


def test_resume_may_change_how_memory_is_spent(recipe_path, tmp_path):
    """Checkpointing, offloading and tiling change what is kept for backward, not the values: a run saved
    before the default became auto, or resumed on another GPU, continues."""
    train(load_recipe(recipe_path, ["train.max_steps=2", "model.gradient_checkpointing=true"]))
    train(load_recipe(recipe_path, ["train.max_steps=3", "resume=true", "model.gradient_checkpointing=auto",
                                    "train.mlp_chunks=2"]))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]


def _poison(monkeypatch, bad_calls):
    """Make the loss NaN on the given calls of pair_losses during training (evaluation calls are not counted)."""
    real, calls = PreferenceMethod.pair_losses, {"n": 0}

    def poisoned(self, model, batch, ref, *args):
        loss = real(self, model, batch, ref, *args)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(PreferenceMethod, "pair_losses", poisoned)


def test_a_nan_batch_is_skipped_and_counted(recipe_path, tmp_path, monkeypatch):
    _poison(monkeypatch, bad_calls={5})  # micro-batch 5 = the first half of step 3
    final = train(load_recipe(recipe_path, ["train.max_steps=6"]))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert final["skipped_steps"] == 1
    assert "loss" not in rows[2] and "grad_norm" not in rows[2]  # the poisoned step's numbers are not logged
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in adapter.values())


def test_nan_steps_in_a_row_stop_the_run_naming_causes_and_keeping_the_checkpoint(recipe_path, tmp_path, monkeypatch):
    _poison(monkeypatch, bad_calls=set(range(9, 100)))  # from step 5 on, every step
    with pytest.raises(UserError, match=r"training stopped at step 7.*train.lr.*fp16.*step-4"):
        train(load_recipe(recipe_path, ["train.max_steps=12", "train.max_nonfinite_steps=3"]))
    assert complete_checkpoints(tmp_path / "run")[-1].name == "step-4"


def test_out_of_memory_names_the_keys_that_reduce_memory(recipe_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PreferenceMethod, "pair_losses", oom)
    with pytest.raises(UserError, match=r"out of GPU memory.*train.batch_size.*data.max_length.*gradient_checkpointing"):
        train(load_recipe(recipe_path, ["train.max_steps=2"]))


# ----------------------------------------------------------------------------- sharded optimizer state (FSDP, ZeRO-3)
# accelerate runs FSDP and DeepSpeed only on GPUs. Here: the protocol around their save / load functions, with the
# engine's part played by a stand-in that writes this process's optimizer state where the engine writes its shards.


def _as_if_sharded(monkeypatch, restore=True):
    from lora_dpo.training import loop, setup

    written = []

    def save(accelerator, model, optimizer, folder):
        assert folder.parent.name.startswith(".step-")  # inside the checkpoint before its rename: never half of one
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(optimizer.state_dict(), folder / f"rank{accelerator.process_index}.pt")
        written.append(folder.parent.name)

    def load(accelerator, model, optimizer, folder):
        if restore:
            optimizer.load_state_dict(torch.load(folder / f"rank{accelerator.process_index}.pt", weights_only=False))

    monkeypatch.setattr(setup, "is_sharded", lambda accelerator: True)
    monkeypatch.setattr(loop, "save_sharded_optimizer", save)
    monkeypatch.setattr(setup, "load_sharded_optimizer", load)
    return written


@pytest.mark.parametrize("restore", [True, False])
def test_a_sharded_runs_optimizer_state_is_in_its_checkpoints_and_resumes_exactly(recipe_path, tmp_path,
                                                                                   monkeypatch, capsys, restore):
    written = _as_if_sharded(monkeypatch, restore)
    whole = tmp_path / "whole"
    train(load_recipe(recipe_path, [f"output_dir={whole}", "train.max_steps=6"]))
    assert sorted(set(written)) == [".step-2.tmp", ".step-4.tmp", ".step-6.tmp"]
    checkpoint = whole / "checkpoints" / "step-2"
    assert (checkpoint / "optimizer_sharded" / "rank0.pt").is_file() and not (checkpoint / "optimizer.pt").exists()

    part = tmp_path / "part"
    shutil.copytree(whole, part)
    capsys.readouterr()
    train(load_recipe(recipe_path, [f"output_dir={part}", "train.max_steps=6", f"resume={part / 'checkpoints' / 'step-2'}"]))
    assert f"restored the sharded optimizer state of {part / 'checkpoints' / 'step-2'}" in capsys.readouterr().err
    resumed, expected = rows_without_timing(part), rows_without_timing(whole)
    # restored, the moments continue and the metrics are the uninterrupted run's; restarted, they are not
    assert (resumed == expected) is restore


def test_a_sharded_checkpoint_without_optimizer_state_resumes_with_a_notice(recipe_path, tmp_path, monkeypatch, capsys):
    _as_if_sharded(monkeypatch)
    train(load_recipe(recipe_path, ["train.max_steps=2"]))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-2" / "optimizer_sharded")  # as an earlier lora-dpo wrote it
    capsys.readouterr()
    train(load_recipe(recipe_path, ["train.max_steps=3", "resume=true"]))
    assert "holds no sharded optimizer state (written by an earlier lora-dpo); the optimizer's moments start afresh" \
        in capsys.readouterr().err


def test_a_zero3_checkpoint_resumes_only_on_as_many_processes_as_wrote_it(tmp_path):
    """DeepSpeed ZeRO-3 keeps one optimizer partition per process: a checkpoint of 2 processes on 1 is refused by
    the process counts, before DeepSpeed's own loader would fail on it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lora_dpo.training.setup import _restore_sharded_optimizer

    checkpoint = tmp_path / "step-2"
    (checkpoint / "optimizer_sharded").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": 2}))
    one = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    with pytest.raises(ConfigError, match="written by 2 processes under DeepSpeed ZeRO-3.*resume it on 2 processes "
                                          r"\(here: 1\)"):
        _restore_sharded_optimizer(one, None, None, checkpoint)
