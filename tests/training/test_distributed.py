"""Several processes, one run: two CPU processes under `accelerate launch` (gloo) train the toy world exactly
as one process with the same global batch does, and a checkpoint written by two processes resumes in one."""

import json
from dataclasses import replace
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_dpo.run.checkpoint import complete_checkpoints
from lora_dpo.config import load_recipe
from lora_dpo.data.order import PairStream, epoch_order, shards, step_micro_batches
from lora_dpo.errors import ConfigError
from lora_dpo.core.stats import PairStats
from lora_dpo.run.metrics import read_metrics
from lora_dpo.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "toy.yaml"
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_gb")
# The toy world, shrunk: 48 training pairs, 4 optimizer steps of 8 pairs, a checkpoint at step 2, 12 eval pairs;
# learning rate and loss pinned here so that the trajectory moves whatever the shipped recipe's tuning.
SMALL = ["data.max_rows=48", "eval.max_pairs=12", "eval.scorer=null", "train.max_steps=4", "train.save_every=2",
         "train.keep_last=null", "train.eval_every=2", "train.warmup_ratio=0.25", "train.lr=1.0e-3",
         "loss.name=dpo", "loss.rpo_alpha=1.0", "lora.dropout=0.0", "overwrite=true"]


# ------------------------------------------------------------------------------ the data split, in pure terms


def test_every_split_of_the_global_batch_takes_the_same_pairs_per_step():
    """One step of 8 pairs: 1 process x batch 8, 2 x 4, 4 x 2, or 1 x 4 accumulated twice: the same 8 pairs."""
    stream = PairStream(n=10, seed=3)
    start = 16  # the third step: crosses from epoch 1 into epoch 2 (10 pairs per epoch)
    expected = stream.take(start, 8)
    assert expected == epoch_order(10, 3, 1)[6:] + epoch_order(10, 3, 2)[:4]
    for batch_size, grad_accum, world in [(8, 1, 1), (4, 1, 2), (2, 1, 4), (4, 2, 1), (2, 2, 2)]:
        got = [p for rank in range(world)
               for micro in step_micro_batches(stream, start, batch_size, grad_accum, rank, world) for p in micro]
        assert sorted(got) == sorted(expected), (batch_size, grad_accum, world)
        per_process = [step_micro_batches(stream, start, batch_size, grad_accum, r, world) for r in range(world)]
        assert all(len(m) == batch_size for micro in per_process for m in micro)  # every process, every micro-batch


def test_evaluation_shards_cover_every_item_once_and_every_process_runs_as_many_batches():
    n, batch_size, world = 9, 2, 3  # global batches of 6: [0..5], then [6, 7] [8] and nothing for process 2
    per_rank = [list(shards(n, batch_size, rank, world)) for rank in range(world)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    real = sorted(i for batches in per_rank for idx, ghost in batches if not ghost for i in idx)
    assert real == list(range(n))
    assert per_rank[1][1] == ([8], False)
    assert per_rank[2][1] == ([6], True)  # a ghost batch: run, then ignored


def test_pair_stats_survive_packing_for_a_reduction():
    stats = PairStats()
    stats.add(torch.tensor([0.5, 1.5]), torch.tensor([0.2, 0.1]), torch.tensor([0.0, 0.3]), torch.tensor([-3.0, -4.0]),
              torch.tensor([-5.0, -6.0]), kl_num=2.0, kl_den=8.0, tokens=40)
    assert set(stats.state()["sums"]) == set(PairStats.SUMMED)
    assert PairStats.from_vector(stats.vector()).state() == stats.state()
    twice = PairStats.from_vector([2 * v for v in stats.vector()])  # what a sum over two processes gives
    assert twice.pairs == 4 and twice.means() == stats.means()


# ---------------------------------------------------------------------------- two processes on the toy world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/ddp.yaml -m lora_dpo train recipes/toy.yaml ...`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()),
           "-m", "lora_dpo", "train", str(RECIPE), *SMALL, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_trajectory(got: list[dict], expected: list[dict]) -> float:
    """Same rows, same numbers within float tolerance; returns the largest loss difference."""
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    worst = 0.0
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["step"], a["split"], key)
            else:
                assert a[key] == value, (a["step"], key)
        if "loss" in b:
            worst = max(worst, abs(a["loss"] - b["loss"]))
    return worst


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    done = launch(2, f"output_dir={out}", "train.batch_size=4")
    assert done.returncode == 0, done.stderr[-4000:]
    return out, rows(out), done.stderr


def test_two_processes_train_as_one_process_with_the_same_global_batch(two_processes, tmp_path):
    out, two, log = two_processes
    assert "8 pairs (4 x 1 x 2 process(es))" in log
    assert log.count("training: 48 pairs") == 1  # only the main process talks
    one_dir = tmp_path / "one"
    train(load_recipe(RECIPE, [*SMALL, f"output_dir={one_dir}", "train.batch_size=8"]))
    one = rows(one_dir)
    assert [r["step"] for r in two if r["split"] == "train"] == [1, 2, 3, 4]
    worst = assert_same_trajectory(two, one)
    print(f"largest loss difference, 2 processes vs 1: {worst:.2e}")
    # the policy moved: the loss trajectory is not flat, so agreeing on it means something
    train_losses = [r["loss"] for r in two if r["split"] == "train"]
    assert max(train_losses) - min(train_losses) > 1e-3
    # one run directory, written once: same files, the recipe saved as given, the adapter equal to one process's
    assert json.loads((out / "run_info.json").read_text())["processes"] == 2
    assert load_recipe(out / "config.yaml") == load_recipe(RECIPE, [*SMALL, f"output_dir={out}", "train.batch_size=4"])
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, one_dir))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert json.loads((out / "eval.json").read_text())["loss"] == pytest.approx(
        json.loads((one_dir / "eval.json").read_text())["loss"], rel=1e-5)


def test_a_checkpoint_written_by_two_processes_resumes_in_one(two_processes, tmp_path):
    out, two, _ = two_processes
    assert [p.name for p in complete_checkpoints(out)] == ["step-2", "step-4"]
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["pairs_per_step"] == 8 and state["pairs_seen"] == 16
    # one process with batch 4 would halve the global batch: refused, naming the value that keeps it
    with pytest.raises(ConfigError, match=r"global batch of 8 pairs.*train.batch_size=8 or train.grad_accum=2"):
        train(load_recipe(RECIPE, [*SMALL, f"output_dir={out}", "train.batch_size=4", f"resume={out}/checkpoints/step-2"]))
    # one process, 4 pairs accumulated twice: the same 8 pairs per step, continuing from step 2
    train(load_recipe(RECIPE, [*SMALL, f"output_dir={out}", "train.batch_size=4", "train.grad_accum=2",
                               f"resume={out}/checkpoints/step-2"]))
    resumed = rows(out)
    assert [r["step"] for r in resumed if r["split"] == "train"] == [1, 2, 3, 4]
    assert_same_trajectory(resumed, two)


def test_accelerate_config_files_load_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp_qlora", "deepspeed_zero3"}
    assert configs["ddp"].distributed_type == "MULTI_GPU"
    assert configs["fsdp_qlora"].distributed_type == "FSDP" and configs["fsdp_qlora"].fsdp_config["fsdp_version"] == 2
    assert configs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3


def test_sharded_bases_store_4bit_weights_in_the_compute_dtype():
    from lora_dpo.model.load import quant_storage_dtype

    model = load_recipe(None, ["output_dir=x", "model.name=m", "data.train=d", "model.dtype=bf16"]).model
    assert quant_storage_dtype(model, torch.bfloat16, sharded=True) == torch.bfloat16
    assert quant_storage_dtype(model, torch.bfloat16, sharded=False) == torch.uint8
    model = replace(model, quant_storage="uint8")  # (recipes are frozen)
    with pytest.raises(ConfigError, match="model.quant_storage"):
        quant_storage_dtype(model, torch.bfloat16, sharded=True)
    with pytest.raises(ConfigError, match=r"model.quant_storage: .* must equal model.dtype \(bf16\)"):
        load_recipe(None, ["output_dir=x", "model.name=m", "data.train=d", "model.dtype=bf16", "model.quant_storage=fp16"])


def test_two_processes_with_shared_prompts_and_length_grouping_train_as_one(tmp_path):
    """The speed levers keep the data-parallel contract: same pairs per step, same trajectory (issue #6)."""
    levers = ["train.shared_prompt=true", "train.group_by_length=true"]
    done = launch(2, f"output_dir={tmp_path / 'two'}", "train.batch_size=4", *levers)
    assert done.returncode == 0, done.stderr[-4000:]
    train(load_recipe(RECIPE, [*SMALL, f"output_dir={tmp_path / 'one'}", "train.batch_size=8", *levers]))
    assert_same_trajectory(rows(tmp_path / "two"), rows(tmp_path / "one"))


# accelerate's own FSDP optimizer functions, called as a checkpoint calls them (training/distributed.py), on a plain
# model in a one-process gloo group: FSDP itself needs GPUs, but these functions take FSDP2's path through
# torch.distributed.checkpoint's state-dict API, which any model has. A fresh interpreter: the process group is global.
FSDP_OPTIMIZER_ROUND_TRIP = """
import os, sys, tempfile, torch
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from lora_dpo.training.distributed import load_sharded_optimizer, save_sharded_optimizer

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
PartialState(cpu=True)
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=sys.argv[1])
accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                              process_index=0, is_main_process=True, wait_for_everyone=lambda: None)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
trained = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(3):
    model(torch.randn(3, 4)).sum().backward()
    trained.step()
    trained.zero_grad(set_to_none=True)
folder = Path(tempfile.mkdtemp()) / "optimizer_sharded"
save_sharded_optimizer(accelerator, model, trained, folder)
fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)  # as a resumed run has it: no state yet
load_sharded_optimizer(accelerator, model, fresh, folder)
a, b = trained.state_dict()["state"], fresh.state_dict()["state"]
same = a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in ("exp_avg", "exp_avg_sq", "step"))
print("files:", sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()), "same:", same)
"""


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_the_fsdp_optimizer_state_round_trips_through_accelerates_functions(kind):
    done = subprocess.run([sys.executable, "-c", FSDP_OPTIMIZER_ROUND_TRIP, kind, str(_free_port())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same: True" in done.stdout, done.stdout
    assert ("optimizer.bin" in done.stdout) is (kind == "FULL_STATE_DICT")  # one gathered file, or DCP's folder
