"""The fit planner: hand-worked weight bytes, monotone in batch and length, a logits term independent of the
vocabulary, proposals that fit, and bad input refused with exit 2 and one message naming the key."""

import json
from dataclasses import replace

import pytest

from lora_dpo.cli import main
from lora_dpo.config import load_recipe
from lora_dpo.logps import LOGITS_BUDGET_BYTES
from lora_dpo.plan import GiB, Setting, Shape, device_total, estimate, load_shape, parse_memory, propose

LLAMA_8B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                 tied=False)
SETTING = Setting(batch_size=1, grad_accum=8, max_length=2048, dtype_bytes=2, quantization="nf4", double_quant=True,
                  gradient_checkpointing=True, activation_offload=False, shared_prompt=False, lora_r=16,
                  lora_dropout=0.0, optimizer="paged_adamw_8bit", eager_attention=False)


def test_weight_and_adapter_terms_by_hand(tiny_llama):
    """The tiny Llama: hidden 64, 2 layers, 4 heads of 16 (2 kv heads), MLP 128, its tokenizer's vocabulary.
    Linear weights per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 3 x 64x128 = 36864;
    two layers 73728, at 0.5 + 1/64 + 4/16384 bytes each (NF4, double quantisation) = 38034 bytes.
    LoRA r=4: r x (in + out) per layer = 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4096; x 2 layers = 8192
    parameters; 8 bytes each for weights and grads, 8 for AdamW."""
    shape = load_shape(load_recipe(None, ["output_dir=x", f"model.name={tiny_llama}", "data.train=x"]).model)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (64, 2, 4, 2, 16)
    terms = estimate(shape, replace(SETTING, lora_r=4, optimizer="adamw"))
    assert terms["base weights"] == round(73728 * (0.5 + 1 / 64 + 4 / 16384)) == 38034
    assert terms["adapter weights and grads"] == 8192 * 8 and terms["optimizer states"] == 8192 * 8
    assert terms["embeddings and head"] == 2 * shape.vocab * 64 * 2


def test_prediction_grows_with_batch_and_length():
    total = lambda **kw: sum(estimate(LLAMA_8B, replace(SETTING, **kw)).values())
    assert total(batch_size=1) < total(batch_size=2) < total(batch_size=4)
    assert total(max_length=512) < total(max_length=1024) < total(max_length=2048)
    assert total(activation_offload=True) < total()
    assert total(gradient_checkpointing=True) < total(gradient_checkpointing=False)


def test_the_logits_term_does_not_grow_with_the_vocabulary():
    small, large = replace(LLAMA_8B, vocab=32000), replace(LLAMA_8B, vocab=256000)
    a, b = estimate(small, SETTING), estimate(large, SETTING)
    assert a["log-prob head"] == b["log-prob head"]
    assert a["log-prob head"] < 4 * LOGITS_BUDGET_BYTES + 2 * 2048 * 4096 * 2
    # only the embedding and head weights grow, by exactly (256000 - 32000) x hidden x 2 bytes x 2 matrices
    assert sum(b.values()) - sum(a.values()) == (256000 - 32000) * 4096 * 2 * 2


def test_the_proposal_fits_and_keeps_the_pairs_per_step():
    big = replace(SETTING, batch_size=8, grad_accum=2)
    budget = 8 * GiB
    assert device_total(sum(estimate(LLAMA_8B, big).values())) > budget
    chosen = propose(LLAMA_8B, big, budget)
    assert chosen is not None and device_total(sum(estimate(LLAMA_8B, chosen).values())) <= budget
    assert chosen.batch_size * chosen.grad_accum >= 16
    assert propose(LLAMA_8B, big, 2 * GiB) is None  # 8B weights alone need more


def test_parse_memory_units():
    assert parse_memory("8GB") == parse_memory("8 GiB") == parse_memory("8g") == 8 * GiB
    assert parse_memory("6144MB") == 6 * GiB


@pytest.mark.parametrize("args, named", [
    (["--gpu-memory", "8XB"], "--gpu-memory"),
    (["--gpu-memory=0GB"], "--gpu-memory"),
    (["train.batch_sise=2", "--gpu-memory", "8GB"], "train.batch_sise"),
    (["train.batch_size=0", "--gpu-memory", "8GB"], "train.batch_size"),
    (["model.name=/no/such/folder", "--gpu-memory", "8GB"], "model.name"),
    (["--gpu-memory", "1MB"], "--gpu-memory"),  # nothing fits
])
def test_bad_input_exits_2_with_one_message_naming_the_key(tmp_path, tiny_llama, capsys, args, named):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name: {tiny_llama}}}\ndata: {{train: x.jsonl}}\n")
    assert main(["plan", str(recipe), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-dpo: error: ") and named in err[0]


def test_plan_command_prints_terms_and_a_proposal(tmp_path, tiny_llama, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name: {tiny_llama}}}\ndata: {{train: x.jsonl}}\n")
    assert main(["plan", str(recipe), "--gpu-memory", "4GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["proposal"] == [] and result["allocated"] == sum(result["terms"].values())


def test_the_4bit_weights_term_matches_what_bitsandbytes_allocates(tiny_llama):
    """Packed NF4 weights + 8-bit absmax + the fp32 second-level absmax, counted on a model loaded in 4 bits
    (the per-layer 256-entry code tables, a few KB in all, are left out of the model)."""
    import bitsandbytes as bnb
    import torch

    from lora_dpo.config import ModelConfig
    from lora_dpo.model import load_base_model
    from lora_dpo.plan import shape_from_config

    model = load_base_model(ModelConfig(name=str(tiny_llama)), torch.device("cpu"))
    allocated = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            allocated += w.data.numel() * w.data.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            allocated += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    predicted = estimate(shape_from_config(model.config), SETTING)["base weights"]
    assert predicted == pytest.approx(allocated, rel=0.01)


@pytest.mark.parametrize("dtype, e", [("fp32", 4), ("bf16", 2)])
def test_the_per_layer_activation_term_matches_what_autograd_keeps(tmp_path, dtype, e):
    """Bytes of the distinct storages autograd saves in a forward of a 4-bit Llama with LoRA on every linear
    layer, without checkpointing: 4 layers minus 2 layers, per layer and token, against the model's term."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dpo.config import LoraConfig, ModelConfig
    from lora_dpo.logps import sequence_logps
    from lora_dpo.model import load_policy
    from lora_dpo.plan import layer_activation_bytes, shape_from_config

    n, t, saved = 4, 64, {}
    for layers in (2, 4):
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp_path / str(layers))
        policy = load_policy(ModelConfig(name=str(tmp_path / str(layers)), dtype=dtype, gradient_checkpointing=False),
                             LoraConfig(r=16, dropout=0.0), torch.device("cpu"))
        policy.train()
        ids = torch.randint(0, 512, (n, t))
        storages = {}

        def pack(x):
            st = x.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sequence_logps(policy, ids, torch.ones(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool))
        saved[layers] = sum(storages.values())
    measured = (saved[4] - saved[2]) / 2 / (n * t)
    assert layer_activation_bytes(shape_from_config(config), e) == pytest.approx(measured, rel=0.12)
