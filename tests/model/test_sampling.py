"""Sampling with the adapter on and off, implicit rewards, scorer loading."""

import pytest
import torch

from lora_dpo.config import LoraConfig, ModelConfig
from lora_dpo.errors import ConfigError
from lora_dpo.config import load_scorer
from lora_dpo.model.sampling import generate, implicit_rewards
from lora_dpo.model.adapters import load_policy
from lora_dpo.model.load import load_tokenizer

PROMPTS = ["the movie was", [{"role": "user", "content": "write a short review"}], "is it good ?"]


@pytest.fixture(scope="module")
def policy(tiny_qwen2):
    model = load_policy(ModelConfig(name=str(tiny_qwen2)), LoraConfig(r=4, dropout=0.0), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that changes the model a lot
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model, load_tokenizer(ModelConfig(name=str(tiny_qwen2)))


def test_sampling_is_reproducible_for_a_seed_and_leaves_the_global_rng_alone(policy):
    model, tok = policy
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=8, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == generate(model, tok, PROMPTS, max_new_tokens=8, seed=7)
    assert len(a) == 3


def test_adapter_off_samples_the_reference_model(policy):
    model, tok = policy
    greedy = dict(max_new_tokens=8, temperature=0)
    ref = generate(model, tok, PROMPTS, adapter=False, **greedy)
    with model.disable_adapter():
        expected = generate(model, tok, PROMPTS, **greedy)
    assert ref == expected
    assert generate(model, tok, PROMPTS, adapter=True, **greedy) != ref


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(policy):
    model, tok = policy
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, temperature=0, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, temperature=0)[0] for p in PROMPTS]
    assert batched == single


def test_implicit_reward_is_beta_times_the_log_ratio(policy):
    from lora_dpo.data.tokenize import encode_reply
    from lora_dpo.core.logps import sequence_logps
    from lora_dpo.model.adapters import reference_model

    model, tok = policy
    p, c = encode_reply(tok, "is it good ?", "yes")
    ids = torch.tensor([p + c])
    mask = torch.tensor([[False] * len(p) + [True] * len(c)])
    model.eval()
    with torch.no_grad():
        pol = sequence_logps(model, ids, torch.ones_like(ids), mask).sums
        with reference_model(model):
            ref = sequence_logps(model, ids, torch.ones_like(ids), mask).sums
    (r,) = implicit_rewards(model, tok, ["is it good ?"], ["yes"], beta=0.5)
    assert r == pytest.approx(0.5 * float(pol - ref), rel=1e-5)
    assert r != 0


def test_scorer_spec_errors_name_the_key():
    assert load_scorer("lora_dpo.toy:positive_share")("the plot was superb .") == 1.0
    for bad in ("nocolon", "lora_dpo.toy:missing", "no_such_module:f", "lora_dpo.toy:WORLD_VERSION"):
        with pytest.raises(ConfigError, match="eval.scorer"):
            load_scorer(bad)
