"""Shared-prompt batches ([prompt | chosen | rejected], one row per pair) give the plain layout's log-probs and
gradients, on Llama and Qwen2, with SDPA and eager attention, padding and one-token completions included."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dpo.core.logps import attention_mask_4d, sequence_logps
from lora_dpo.data.batches import collate, collate_shared
from lora_dpo.data.pairs import EncodedPair
from tiny import random_pairs as make_pairs
from tiny import shared_sequence_logps


def test_collate_shared_layout_by_hand():
    pair = EncodedPair(index=7, prompt="", prompt_ids=[10, 11, 12], chosen_ids=[20, 21], rejected_ids=[30])
    b = collate_shared([pair], pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]  # rejected restarts after the prompt
    assert b["segments"].tolist() == [[1, 1, 1, 2, 2, 3]]
    # c0 from p2 (index 2), c1 from c0 (3); r0 from p2 (2)
    assert b["score_index"].tolist() == [2, 3, 2] and b["score_target"].tolist() == [20, 21, 30]
    assert b["score_seq"].tolist() == [0, 0, 1] and b["index"].tolist() == [7]
    allowed = attention_mask_4d(b["segments"], "sdpa", torch.float32)[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True]  # r0 sees the prompt and itself only


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_shared_prompt_logps_and_gradients_equal_the_plain_layout(request, fixture, attn):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), attn_implementation=attn)
    pairs = make_pairs(model.config.vocab_size)
    plain = collate(pairs, pad_id=0)
    ref = sequence_logps(model, plain["input_ids"], plain["attention_mask"], plain["loss_mask"])
    (ref.sums * torch.linspace(1, 2, 8)).sum().backward()  # distinct weights: a swapped sequence would show
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = shared_sequence_logps(model, collate_shared(pairs, pad_id=0), chunk_tokens=5)
    (ours.sums * torch.linspace(1, 2, 8)).sum().backward()
    torch.testing.assert_close(ours.sums, ref.sums, rtol=1e-5, atol=1e-5)
    assert ours.counts.tolist() == ref.counts.tolist() == [4, 1, 5, 3, 6, 2, 5, 1]
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_training_with_shared_prompts_logs_the_plain_layouts_metrics(tmp_path, tiny_qwen2):
    """End to end on the 4-bit base: same losses, rewards, log-probs and gradient norms, step by step."""
    import json

    from lora_dpo.config import load_recipe
    from lora_dpo.run.metrics import read_metrics
    from lora_dpo.training.loop import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
                                          "rejected": f"no {i % 5}"}) for i in range(12)))

    def run(name, shared):
        recipe = load_recipe(None, [f"output_dir={tmp_path / name}", f"model.name={tiny_qwen2}", f"data.train={data}",
                                    "data.max_length=32", "data.eval_fraction=0.25", "lora.r=4", "lora.dropout=0.0",
                                    "train.batch_size=3", "train.lr=5e-3", "train.warmup_ratio=0", "train.max_steps=3",
                                    "train.reference_cache=null", f"train.shared_prompt={shared}"])
        train(recipe)
        return read_metrics(tmp_path / name / "metrics.jsonl")

    plain, shared = run("plain", "false"), run("shared", "true")
    keys = ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "kl", "grad_norm")
    assert [r["split"] for r in shared] == [r["split"] for r in plain]
    for a, b in zip(plain, shared):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def test_shared_prompts_with_flash_attention_are_refused_before_the_model_loads():
    from lora_dpo.config import load_recipe
    from lora_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.shared_prompt: model.attn_implementation=flash_attention_2"):
        load_recipe(None, ["output_dir=x", "model.name=m", "data.train=d", "train.shared_prompt=true",
                           "model.attn_implementation=flash_attention_2"])


def test_auto_uses_the_shared_layout_only_where_it_is_exact():
    """auto (the default): on for full attention; off, with the reason, when a sliding window shorter than
    max_length could bind (the 4D mask has no window) or the attention takes no 4D mask; true there is an error
    naming the key; false is always off."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from lora_dpo.config import load_recipe
    from lora_dpo.errors import ConfigError
    from lora_dpo.model.layout import decide_layout as use_shared_prompt

    recipe = lambda *kv: load_recipe(None, ["output_dir=x", "model.name=toy", "data.train=x", "data.max_length=64", *kv])  # noqa: E731
    full, windowed = LlamaConfig(), MistralConfig(sliding_window=32)
    assert use_shared_prompt(recipe(), full) == (True, None)
    on, why = use_shared_prompt(recipe(), windowed)
    assert not on and "sliding window of 32" in why and "data.max_length=64" in why
    assert use_shared_prompt(recipe("data.max_length=32"), windowed) == (True, None)  # the window cannot bind
    assert use_shared_prompt(recipe(), Qwen2Config(sliding_window=32, use_sliding_window=False)) == (True, None)
    with pytest.raises(ConfigError, match="^train.shared_prompt: the model attends through a sliding window"):
        use_shared_prompt(recipe("train.shared_prompt=true"), windowed)
    assert use_shared_prompt(recipe("train.shared_prompt=false"), full) == (False, None)
    on, why = use_shared_prompt(recipe("model.attn_implementation=flash_attention_2"), full)
    assert not on and "flash_attention_2" in why
    with pytest.raises(ConfigError, match="train.shared_prompt"):
        recipe("model.attn_implementation=flash_attention_2", "train.shared_prompt=true")
