"""The fit planner: hand-worked weight bytes, monotone in batch and length, a logits term independent of the
vocabulary, proposals that fit, and bad input refused with exit 2 and one message naming the key."""

import json
from dataclasses import replace

import pytest

from lora_dpo.cli import main
from lora_dpo.config import load_recipe
from lora_dpo.core.logps import LOGITS_BUDGET_BYTES
from lora_dpo.cli.plan import load_shape, plan
from lora_dpo.memory.plan import GiB, Setting, Shape, device_total, estimate, parse_memory, peak_of, propose

LLAMA_8B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                 tied=False)
SETTING = Setting(batch_size=1, grad_accum=8, max_length=2048, dtype_bytes=2, quantization="nf4", double_quant=True,
                  gradient_checkpointing=True, activation_offload=False, shared_prompt=False, lora_r=16,
                  lora_dropout=0.0, optimizer="paged_adamw_8bit", eager_attention=False, eval_batch=1)


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
    total = lambda **kw: peak_of(estimate(LLAMA_8B, replace(SETTING, **kw)))
    assert total(batch_size=1) < total(batch_size=2, eval_batch=2) < total(batch_size=4, eval_batch=4)
    assert total(eval_batch=1) < total(eval_batch=8)  # the no-grad pass over 8 pairs outgrows a step over 1
    assert total(max_length=512) < total(max_length=1024) < total(max_length=2048)
    assert total(activation_offload=True) < total()
    assert total(gradient_checkpointing=True) < total(gradient_checkpointing=False)


def test_the_logits_term_does_not_grow_with_the_vocabulary():
    small, large = replace(LLAMA_8B, vocab=32000), replace(LLAMA_8B, vocab=256000)
    a, b = estimate(small, SETTING), estimate(large, SETTING)
    assert a["log-prob head"] == b["log-prob head"]
    assert a["log-prob head"] <= 4 * LOGITS_BUDGET_BYTES + 2 * 2048 * 4096 * 2
    # only the embedding and head weights grow, by exactly (256000 - 32000) x hidden x 2 bytes x 2 matrices
    assert sum(b.values()) - sum(a.values()) == (256000 - 32000) * 4096 * 2 * 2


def test_the_proposal_fits_and_keeps_the_pairs_per_step():
    big = replace(SETTING, batch_size=8, grad_accum=2)
    budget = 8 * GiB
    assert device_total(peak_of(estimate(LLAMA_8B, big))) > budget
    chosen = propose(LLAMA_8B, big, budget)
    assert chosen is not None and device_total(peak_of(estimate(LLAMA_8B, chosen))) <= budget
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
    assert result["fits"] and result["proposal"] == [] and result["allocated"] == peak_of(result["terms"])
    assert "x.jsonl" in result["lengths"] and "not read" in result["lengths"]  # no such file: max_length, and why


def test_the_worst_batch_comes_from_the_data(tmp_path, tiny_llama, capsys):
    """Pairs far shorter than max_length: the prediction sizes the widest pairs, not max_length, and is lower."""
    rows = [{"prompt": "hello " * (3 + i), "chosen": "yes " * (2 + i), "rejected": "no " * (1 + 2 * i)} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name: {tiny_llama}}}\n"
                      f"data: {{train: {tmp_path / 'd.jsonl'}, max_length: 1024}}\ntrain: {{batch_size: 2, shared_prompt: false}}\n")
    results = {}
    for lengths in ("data", "max"):
        assert main(["plan", str(recipe), "--gpu-memory", "4GB", "--json", "--lengths", lengths]) == 0
        results[lengths] = json.loads(capsys.readouterr().out)
    assert results["max"]["worst_batch"] == [4, 1024]
    rows_, width = results["data"]["worst_batch"]
    assert rows_ == 4 and 10 < width < 200 and "training pairs in" in results["data"]["lengths"]
    assert results["data"]["allocated"] < results["max"]["allocated"]


def test_the_proposal_reaches_for_the_levers_an_8b_model_needs():
    """8B at 2 x 2048 on an 8 GiB GPU: batch 1 alone does not fit; the proposal adds levers, cheapest first."""
    s = replace(SETTING, batch_size=1, shared_prompt=True, gradient_checkpointing=True)
    assert device_total(peak_of(estimate(LLAMA_8B, s))) > 8 * GiB
    chosen = propose(LLAMA_8B, s, 8 * GiB)
    assert chosen is not None and chosen.embeddings_on_cpu and chosen.max_length == 2048
    assert estimate(LLAMA_8B, chosen)["embeddings and head"] == 128256 * 4096 * 2  # the head alone
    tied = propose(replace(LLAMA_8B, tied=True), s, 7 * GiB)  # a shared table never moves: not proposed
    assert tied is not None and not tied.embeddings_on_cpu


def test_the_4bit_weights_term_matches_what_bitsandbytes_allocates(tiny_llama):
    """Packed NF4 weights + 8-bit absmax + the fp32 second-level absmax, counted on a model loaded in 4 bits
    (the per-layer 256-entry code tables, a few KB in all, are left out of the model)."""
    import bitsandbytes as bnb
    import torch

    from lora_dpo.config import ModelConfig
    from lora_dpo.model.load import load_base_model
    from lora_dpo.memory.plan import shape_from_config

    model = load_base_model(ModelConfig(name=str(tiny_llama)), torch.device("cpu"))
    allocated = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            allocated += w.data.numel() * w.data.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            allocated += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    predicted = estimate(shape_from_config(model.config), SETTING)["base weights"]
    assert predicted == pytest.approx(allocated, rel=0.01)


@pytest.mark.parametrize("dtype, e, autocast", [("fp32", 4, False), ("bf16", 2, False), ("bf16", 2, True)])
def test_the_per_layer_activation_term_matches_what_autograd_keeps(tmp_path, dtype, e, autocast):
    """Bytes of the distinct storages autograd saves in a forward of a 4-bit Llama with LoRA on every linear
    layer, without checkpointing: 4 layers minus 2 layers, per layer and token, against the model's term."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dpo.config import LoraConfig, ModelConfig
    from lora_dpo.core.logps import sequence_logps
    from lora_dpo.model.adapters import load_policy
    from lora_dpo.memory.plan import layer_activation_bytes, shape_from_config

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

        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
            sequence_logps(policy, ids, torch.ones(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool))
        saved[layers] = sum(storages.values())
    measured = (saved[4] - saved[2]) / 2 / (n * t)
    assert layer_activation_bytes(shape_from_config(config), e, autocast=autocast) == pytest.approx(measured, rel=0.12)


def test_peak_memory_counts_the_tensors_alive_at_the_worst_moment():
    import torch

    from lora_dpo.memory.track import peak_memory

    mib = 2**20
    with peak_memory() as peak:
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(4 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(6 * mib, dtype=torch.uint8)  # 4 + 6 alive: the peak
        del b, c
        d = torch.empty(2 * mib, dtype=torch.uint8)
    assert peak.bytes == 10 * mib and d.numel() == 2 * mib


def _widths(pairs):
    from lora_dpo.data.order import row_length

    return tuple((row_length(p, False), row_length(p, True), len(p.chosen_ids) + len(p.rejected_ids)) for p in pairs)


@pytest.mark.parametrize("shared, checkpointing, chunks, dtype", [
    (False, True, 1, "fp32"), (False, True, 4, "fp32"), (True, True, 1, "fp32"), (False, False, 1, "fp32"),
    (True, False, 4, "fp32"), (False, True, 1, "bf16"), (False, 2, 1, "fp32"), (True, 1, 1, "bf16"),
])
def test_the_predicted_peak_is_within_8_percent_of_the_measured_one(calibration_model, shared, checkpointing,
                                                                    chunks, dtype):
    """One DPO step (policy forward, loss, backward, AdamW step) on the batch of the 4 widest pairs, its peak
    tensor memory measured on the CPU (memtrack) on top of the model's own tensors, against `estimate` for the
    same setting. bf16 runs under autocast, as a GPU recipe does (no fp32 copies of LoRA inputs). `checkpointing`:
    every layer, none, or that many of the 4 (what `auto` chooses among)."""
    import bitsandbytes as bnb
    import torch

    from lora_dpo.config import LoraConfig, ModelConfig
    from lora_dpo.data.batches import collate

    from lora_dpo.data.order import row_length
    from lora_dpo.memory.track import peak_memory
    from lora_dpo.model.adapters import load_policy, trainable_parameters
    from lora_dpo.memory.plan import peak_of, shape_from_config
    from tiny import shared_sequence_logps
    from lora_dpo.data.batches import collate_shared
    from lora_dpo.model.tiling import tile_mlps
    from lora_dpo.model.checkpointing import checkpoint_layers

    folder, pairs = calibration_model
    policy = load_policy(ModelConfig(name=str(folder), dtype=dtype, gradient_checkpointing=bool(checkpointing)),
                         LoraConfig(r=16, dropout=0.0), torch.device("cpu"))
    layers = checkpoint_layers(policy, 4 if checkpointing is True else int(checkpointing))
    tile_mlps(policy, chunks)
    policy.train()
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=1e-4)
    model_bytes = sum(t.numel() * t.element_size() for t in [*policy.parameters(), *policy.buffers()])
    for module in policy.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            model_bytes += qs.absmax.numel() * qs.absmax.element_size()
            model_bytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    widest = sorted(pairs, key=lambda p: row_length(p, shared), reverse=True)[:4]
    with peak_memory() as peak, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        if shared:
            sums = shared_sequence_logps(policy, collate_shared(widest, 0)).sums
        else:
            batch = collate(widest, 0)
            sums = sequence_logps_of(policy, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (sums[:4] - sums[4:])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    setting = replace(SETTING, batch_size=4, grad_accum=1, max_length=512, dtype_bytes=4 if dtype == "fp32" else 2,
                      gradient_checkpointing=bool(checkpointing), checkpointed=None if checkpointing is True else int(checkpointing),
                      shared_prompt=shared, optimizer="adamw",
                      autocast=dtype == "bf16", mlp_chunks=chunks, widths=_widths(pairs))
    assert layers == 4
    predicted = peak_of(estimate(shape_from_config(policy.config), setting))
    assert predicted == pytest.approx(model_bytes + peak.bytes, rel=0.08)


def sequence_logps_of(policy, batch):
    from lora_dpo.core.logps import sequence_logps

    return sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sums


def test_peak_memory_phases_count_what_is_alive_when_they_start():
    import torch

    from lora_dpo.memory.track import peak_memory

    from lora_dpo.memory.track import live_tensor_bytes

    mib = 2**20
    before = live_tensor_bytes()  # (other tests' tensors still alive in this process)
    with peak_memory() as peak:
        weights = torch.empty(8 * mib, dtype=torch.uint8)
        staging = torch.empty(8 * mib, dtype=torch.uint8)  # load: 16 allocated in the block
        del staging
        peak.mark("train")
        step = torch.empty(3 * mib, dtype=torch.uint8)  # train: everything alive + 3
        del step
    assert peak.phases == {"start": 16 * mib, "train": before + 11 * mib} and weights.numel()


def test_plan_resolves_auto_checkpointing_for_the_gpu_it_is_given(tmp_path, calibration_model, capsys):
    """`model.gradient_checkpointing: auto` (the default): no layer checkpointed where everything fits, some of
    them as the GPU shrinks, every one (and then the other levers) where even that is over."""
    from lora_dpo.model.checkpointing import AUTO_HEADROOM
    from lora_dpo.memory.plan import ALLOCATOR_SLACK

    folder, _ = calibration_model
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name: {folder}, quantization: none, dtype: fp32}}\n"
                      "data: {train: x.jsonl, max_length: 1024}\ntrain: {batch_size: 8}\neval: {batch_size: 1}\n")

    def planned(memory):
        return plan(load_recipe(str(recipe)), memory)

    assert main(["plan", str(recipe), "--gpu-memory", "80GB"]) == 0
    assert "gradient checkpointing (auto: the fewest layers that fit): 0 of 4 layers" in capsys.readouterr().out
    roomy = planned(80 * GiB)
    layers = roomy["shape"]["layers"]
    assert roomy["auto_checkpointing"] and roomy["checkpointed_layers"] == 0 and roomy["proposal"] == []
    tight = planned(GiB // 2 + 1)  # the CUDA context alone is 0.5 GiB
    assert tight["checkpointed_layers"] == layers == 4
    between = (roomy["allocated"] + tight["allocated"]) // 2  # what auto may allocate: 85% of the free memory
    some = planned(int(GiB // 2 + between * (1 + ALLOCATOR_SLACK) / AUTO_HEADROOM) + 2**20)
    assert 0 < some["checkpointed_layers"] < layers and some["fits"] and some["proposal"] == []
    assert tight["allocated"] < some["allocated"] <= between < roomy["allocated"]


def test_the_fewest_checkpointed_layers_are_the_first_that_fit():
    """The bisection gives what trying 0, 1, 2, ... layers in turn would, at every budget across the range
    (one checkpointed layer may peak above none: it adds the recompute's transient)."""
    from lora_dpo.memory.plan import fewest_checkpointed

    s = replace(SETTING, batch_size=2, grad_accum=1)
    peaks = [peak_of(estimate(LLAMA_8B, replace(s, gradient_checkpointing=k > 0, checkpointed=k)))
             for k in range(LLAMA_8B.layers + 1)]
    assert peaks[1:] == sorted(peaks[1:], reverse=True) and len(set(peaks)) > 30
    for budget in range(peaks[-1] - 1, peaks[0] + 2, (peaks[0] - peaks[-1]) // 97):
        first = next((k for k, peak in enumerate(peaks) if peak <= budget), None)
        assert fewest_checkpointed(LLAMA_8B, s, budget) == first
