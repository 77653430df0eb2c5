"""The training loop on tiny models: run directory, determinism, reference caching, accumulation, learning."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_dpo.config import load_recipe
from lora_dpo.errors import ConfigError
from lora_dpo.core.losses import LOSSES
from lora_dpo.run.metrics import read_metrics
from lora_dpo.training.loop import train

METRIC_NAMES = {"step", "epoch", "split", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "kl", "lr", "grad_norm",
                "pairs_per_s", "tokens_per_s", "peak_memory_gb", "skipped_steps"}


def write_pairs(path, n=24):
    """Pairs with an obvious preference: the chosen reply says 'yes', the rejected one 'no'."""
    rows = [{"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
             "rejected": f"no it is bad {i % 5}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def make_recipe(tmp_path, tiny_qwen2):
    data = write_pairs(tmp_path / "pairs.jsonl")

    def make(name="run", *overrides):
        base = [f"output_dir={tmp_path / name}", f"model.name={tiny_qwen2}", f"data.train={data}",
                "data.max_length=32", "data.eval_fraction=0.25", "lora.r=4", "lora.dropout=0.0",
                "train.batch_size=3", "train.lr=5e-3", "train.epochs=1", "train.warmup_ratio=0",
                "eval.batch_size=4"]
        return load_recipe(None, base + list(overrides))

    return make


def test_run_directory_holds_config_metrics_adapter_and_eval(make_recipe, tiny_qwen2):
    recipe = make_recipe("run", "train.eval_every=2")
    final = train(recipe)
    out = recipe.output_dir
    assert load_recipe(f"{out}/config.yaml") == recipe
    rows = read_metrics(f"{out}/metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # 18 train pairs / 3 per step
    assert set(train_rows[0]) == METRIC_NAMES
    assert [r["step"] for r in eval_rows] == [2, 4, 6]  # every 2 steps, the last one is the final eval
    assert json.loads(open(f"{out}/eval.json").read()) == final
    info = json.loads(open(f"{out}/run_info.json").read())  # the reproducibility record
    assert info["packages"]["torch"] and info["packages"]["peft"] and info["device"] == "cpu"
    assert len(info["data"]["train"]) == 64 and info["data"]["train"] != info["data"]["eval"]  # sha256 hex
    report = json.loads(open(f"{out}/data_report.json").read())
    assert report["rows_read"] == 24 and report["train_pairs"] == 18
    assert sorted(p.name for p in Path(out, "plots").glob("*.png")) == ["accuracy.png", "kl.png", "loss.png", "margin.png", "overview.png"]
    assert final["pairs"] == 6 and final["baseline"]["loss"] == pytest.approx(0.693147, abs=1e-5)  # log 2 at start
    # the adapter loads with plain peft onto the base and reproduces the policy
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    loaded = PeftModel.from_pretrained(base, f"{out}/adapter")
    assert any(torch.count_nonzero(p) for n, p in loaded.named_parameters() if "lora_B" in n)


def test_policy_learns_the_preference_on_training_pairs(make_recipe):
    """After a few steps the implicit reward ranks chosen above rejected on held-out pairs of the same kind."""
    final = train(make_recipe("learn", "train.epochs=4"))
    assert final["rewards/accuracies"] == 1.0
    assert final["rewards/margins"] > 0.1
    assert final["loss"] < 0.693147 - 0.05
    assert final["kl"] != 0.0


def test_training_is_deterministic_on_cpu(make_recipe):
    timing = ("pairs_per_s", "tokens_per_s", "peak_memory_gb")

    def run(name):
        recipe = make_recipe(name)
        train(recipe)
        return [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(f"{recipe.output_dir}/metrics.jsonl")]

    first, second = run("a"), run("b")
    assert len(first) == 7 and first == second  # every loss, reward and gradient norm to the last digit


def test_precomputed_reference_gives_the_same_training_as_a_reference_pass_per_step(make_recipe):
    cached = train(make_recipe("cached", "train.precompute_reference=true"))
    inline = train(make_recipe("inline", "train.precompute_reference=false"))
    for key in ("loss", "rewards/margins", "kl", "logps/chosen"):
        assert cached[key] == pytest.approx(inline[key], rel=1e-4, abs=1e-6)


def test_gradient_accumulation_matches_one_larger_batch(make_recipe):
    """One step of 6 pairs equals one step of 3 pairs accumulated twice: same loss, same adapter."""
    big = make_recipe("big", "train.batch_size=6", "train.max_steps=1", "data.eval_fraction=0", "train.max_grad_norm=0")
    acc = make_recipe("acc", "train.batch_size=3", "train.grad_accum=2", "train.max_steps=1",
                      "data.eval_fraction=0", "train.max_grad_norm=0")
    train(big), train(acc)
    rb, ra = read_metrics(f"{big.output_dir}/metrics.jsonl")[0], read_metrics(f"{acc.output_dir}/metrics.jsonl")[0]
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    from safetensors.torch import load_file

    wa = load_file(f"{acc.output_dir}/adapter/adapter_model.safetensors")
    wb = load_file(f"{big.output_dir}/adapter/adapter_model.safetensors")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_existing_run_is_not_overwritten_unless_asked(make_recipe):
    train(make_recipe("once", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_recipe("once", "train.max_steps=1"))
    train(make_recipe("once", "train.max_steps=2", "overwrite=true"))
    assert read_metrics(f"{make_recipe('once').output_dir}/metrics.jsonl")[-2]["step"] == 2


@pytest.mark.parametrize("loss", sorted(n for n, s in LOSSES.items() if s.paired and s.needs_reference))
def test_every_loss_moves_the_policy_toward_the_chosen_replies(make_recipe, loss):
    smoothing = "loss.label_smoothing=0.1" if loss in ("dpo", "robust") else "loss.label_smoothing=0"
    final = train(make_recipe(f"l-{loss}", f"loss.name={loss}", "train.epochs=4", smoothing))
    assert final["rewards/accuracies"] >= 5 / 6, final
    assert final["rewards/margins"] > 0
    assert final["loss"] < final["baseline"]["loss"]


def test_tensorboard_tracker_receives_the_metrics_when_enabled(make_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = make_recipe("tb", "train.max_steps=3", "train.report_to=[tensorboard]")
    train(recipe)
    events = list(Path(recipe.output_dir).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert "eval/rewards/accuracies" in acc.Tags()["scalars"]


def test_trackers_are_off_by_default(make_recipe):
    recipe = make_recipe("no-tb", "train.max_steps=1")
    train(recipe)
    assert not list(Path(recipe.output_dir).rglob("events.out.tfevents.*"))


def test_rpo_alpha_adds_the_chosen_nll_linearly(make_recipe):
    """At step 1 the policy is the same for every alpha, so the logged loss is dpo + alpha * nll: linear in alpha."""
    losses = []
    for alpha in (0, 1, 2):
        recipe = make_recipe(f"rpo{alpha}", "train.max_steps=1", "data.eval_fraction=0", f"loss.rpo_alpha={alpha}")
        train(recipe)
        losses.append(read_metrics(f"{recipe.output_dir}/metrics.jsonl")[0]["loss"])
    nll = losses[1] - losses[0]
    assert nll > 0.5  # a random tiny model: several nats per token
    assert losses[2] - losses[1] == pytest.approx(nll, rel=1e-4)
