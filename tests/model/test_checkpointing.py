"""`model.gradient_checkpointing: auto`: the fewest checkpointed layers that fit, the same math whatever the
count, a recompute only where a layer is checkpointed, and every layer where nothing can be predicted."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lora_dpo.model import checkpointing
from lora_dpo.model.checkpointing import apply_auto, checkpoint_layers, decoder_layers, resolve_auto, spread
from lora_dpo.config import LoraConfig, ModelConfig, load_recipe
from lora_dpo.data.batches import collate

from lora_dpo.core.logps import sequence_logps
from lora_dpo.memory.track import peak_memory
from lora_dpo.model.adapters import load_policy

TOY = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"


def test_spread_checkpoints_k_layers_evenly():
    assert spread(0, 4) == [False] * 4 and spread(4, 4) == [True] * 4
    assert spread(2, 4) == [False, True, False, True]
    assert spread(3, 8) == [False, False, True, False, False, True, False, True]
    assert all(sum(spread(k, 16)) == k for k in range(17))


def _policy(folder):
    policy = load_policy(ModelConfig(name=str(folder), gradient_checkpointing=True), LoraConfig(r=8, dropout=0.0),
                         torch.device("cpu"))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():  # B != 0, so that every LoRA parameter gets a gradient
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    policy.train()
    return policy


def test_any_count_of_checkpointed_layers_gives_the_same_logps_and_gradients_and_recomputes_only_those(calibration_model):
    folder, pairs = calibration_model
    policy = _policy(folder)
    layers = decoder_layers(policy)
    calls = [0] * len(layers)

    def counted(i, forward):
        def run(*args, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)
        return run

    for i, layer in enumerate(layers):  # (the recompute runs forward without the module's hooks)
        layer.mlp.forward = counted(i, layer.mlp.forward)
    batch = collate(pairs[:4], pad_id=0)
    runs = {}
    for k in (len(layers), 2, 0):
        assert checkpoint_layers(policy, k) == len(layers)
        calls[:] = [0] * len(layers)
        policy.zero_grad(set_to_none=True)
        with peak_memory() as peak:
            sums = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sums
            sums.sum().backward()
        runs[k] = (sums.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad},
                   peak.bytes)
        # a checkpointed layer runs forward twice (forward, then its recompute in backward); the others once
        assert calls == [2 if on else 1 for on in spread(k, len(layers))]
    full = runs[len(layers)]
    for k in (2, 0):
        torch.testing.assert_close(runs[k][0], full[0], rtol=0, atol=1e-6)
        for name, grad in full[1].items():
            torch.testing.assert_close(runs[k][1][name], grad, rtol=0, atol=1e-6 * float(grad.abs().max()))
    assert full[2] < runs[2][2] < runs[0][2]  # the memory it buys back


def _recipe(tmp_path, *overrides):
    return load_recipe(str(TOY), [f"output_dir={tmp_path / 'run'}", *overrides])


def test_auto_checkpoints_the_fewest_layers_that_fit_the_free_memory(tiny_llama, tmp_path, monkeypatch):
    from lora_dpo.memory.plan import ALLOCATOR_SLACK, Setting, estimate, fewest_checkpointed, peak_of, shape_from_config
    from transformers import AutoConfig

    recipe = _recipe(tmp_path, f"model.name={tiny_llama}", "model.quantization=none", "model.dtype=fp32",
                     "data.max_length=512", "train.batch_size=8", "eval.batch_size=1")  # (the step sets the peak)
    config = AutoConfig.from_pretrained(tiny_llama)
    shape = shape_from_config(config)
    setting = Setting.of(recipe)
    peaks = [peak_of(estimate(shape, replace(setting, gradient_checkpointing=k > 0, checkpointed=k)))
             for k in range(shape.layers + 1)]
    assert peaks[1:] == sorted(peaks[1:], reverse=True) and peaks[0] > peaks[-1]  # each layer on saves memory
    assert fewest_checkpointed(shape, setting, peaks[0]) == 0
    assert fewest_checkpointed(shape, setting, peaks[1]) == 1
    assert fewest_checkpointed(shape, setting, peaks[-1] - 1) is None

    def free(nbytes):
        monkeypatch.setattr(checkpointing, "available_memory", lambda device: nbytes)
        return resolve_auto(recipe, None, config, torch.device("cpu"), False)

    room = lambda peak: int(peak * (1 + ALLOCATOR_SLACK) / checkpointing.AUTO_HEADROOM) + 16
    assert free(10**12)[0] == 0
    assert free(room(peaks[1]))[0] == 1
    k, why = free(room(peaks[-1]) // 2)
    assert k == shape.layers and "even every layer" in why
    assert free(None) == (None, "the free memory of cpu cannot be read")


@pytest.mark.parametrize("override, why", [
    ("train.activation_offload=true", "train.activation_offload"),
    ("online.enabled=true,online.judge=toy", "online DPO"),
])
def test_auto_checkpoints_every_layer_where_it_cannot_predict(tmp_path, override, why):
    from transformers import LlamaConfig

    recipe = _recipe(tmp_path, *override.split(","))
    k, reason = resolve_auto(recipe, None, LlamaConfig(num_hidden_layers=2), torch.device("cpu"), False)
    assert k is None and why in reason
    moe = LlamaConfig(num_hidden_layers=2)
    moe.num_local_experts = 8
    assert resolve_auto(_recipe(tmp_path), None, moe, torch.device("cpu"), False) == (
        None, "a mixture of experts is not in the memory model")


def test_a_run_logs_what_auto_chose_and_true_keeps_every_layer(tmp_path, capsys):
    from lora_dpo.training.loop import train

    train(_recipe(tmp_path, "model.gradient_checkpointing=auto", "train.max_steps=1", "eval.num_prompts=0"))
    err = capsys.readouterr().err
    # the toy model is small beside any machine's free memory: nothing to recompute
    assert "gradient checkpointing (auto): 0 of 2 layers (the fewest whose predicted peak fits" in err
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["checkpointed_layers"] == "0 of 2"
    train(_recipe(tmp_path, "model.gradient_checkpointing=true", "train.max_steps=1", "eval.num_prompts=0",
                  "overwrite=true"))
    assert "gradient checkpointing (auto)" not in capsys.readouterr().err


def test_apply_auto_leaves_an_explicit_setting_alone(calibration_model, tmp_path):
    folder, _ = calibration_model
    policy = _policy(folder)
    recipe = _recipe(tmp_path, "model.gradient_checkpointing=true")
    assert apply_auto(recipe, policy, None, torch.device("cpu")) is None
    assert all(layer.gradient_checkpointing for layer in decoder_layers(policy))
