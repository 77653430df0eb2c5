"""Online DPO's sampling and judging: judges, sampling from the policy, best/worst pairs."""

import math
import random
import sys

import pytest
import torch


from lora_dpo.config import DataConfig, LoraConfig, ModelConfig
from lora_dpo.data.pairs import truncate_pair as _truncate
from lora_dpo.data.tokenize import encode_completion, encode_prompt
from lora_dpo.errors import ConfigError
from lora_dpo.model.adapters import load_policy
from lora_dpo.model.load import load_tokenizer
from lora_dpo.methods.judges import CallableJudge, check_judge_spec, load_judge
from lora_dpo.methods.online import Sample, build_pairs, online_pairs, prompt_ids, sample_completions
from lora_dpo.toy import UNGRAMMATICAL_SCORE, is_grammatical, sample_prompt, sentiment_score, toy_model_path
from tiny import chatml_tokenizer

PROMPTS = ["the movie was", [{"role": "user", "content": "write a short review"}], "is it good ?"]
SAMPLING = dict(max_new_tokens=6, temperature=1.0, top_p=1.0)

POSITIVE = "i loved it . the acting was superb . the plot felt clever . the music is moving ."  # +3
NEUTRAL = "i watched it . the acting was long . the plot felt simple . the music is loud ."  # 0
NEGATIVE = "i hated it . the acting was dull . the plot felt boring . the music is awful . the ending was weak ."  # -4


# judges named `test_online:...` in the tests below (pytest puts tests/ on sys.path, as conftest's `tiny` import shows)
CALLS = []


def shortest_wins(prompt, completions):
    CALLS.append((prompt, list(completions)))
    return [-float(len(c)) for c in completions]


def one_score_short(prompt, completions):
    return [1.0] * (len(completions) - 1)


def returns_text(prompt, completions):
    return ["good"] * len(completions)


def returns_nan(prompt, completions):
    return [math.nan] * len(completions)


def returns_none(prompt, completions):
    return None


def returns_tensor(prompt, completions):
    return torch.arange(len(completions), dtype=torch.float32)


NOT_CALLABLE = 3


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def policy(tiny_qwen2):
    """Tiny Qwen2 (random weights, ChatML) with a LoRA adapter that changes it a lot; it rarely says EOS."""
    model = load_policy(ModelConfig(name=str(tiny_qwen2)), LoraConfig(r=4, dropout=0.0), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model, load_tokenizer(ModelConfig(name=str(tiny_qwen2)))


@pytest.fixture(scope="module")
def toy_policy():
    """The toy world's pre-trained 4-bit base with a fresh adapter: it writes reviews that end with EOS."""
    toy_model_path()  # built once (about a minute), then cached
    cfg = ModelConfig(name="toy")
    return load_policy(cfg, LoraConfig(r=4, dropout=0.0), torch.device("cpu")), load_tokenizer(cfg)


def toy_prompts(n, seed=0):
    rng = random.Random(seed)
    return [sample_prompt(rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------------- judges


def test_toy_judge_ranks_by_the_known_truth_and_puts_broken_text_last():
    judge = load_judge("toy")
    broken = ["superb superb superb wonderful", "i loved it . the acting was superb", ""]
    assert not any(is_grammatical(t) for t in broken)
    (scores,) = judge(["review the night train ."], [[POSITIVE, NEUTRAL, NEGATIVE] + broken])
    assert scores == [3.0, 0.0, -4.0, UNGRAMMATICAL_SCORE, UNGRAMMATICAL_SCORE, UNGRAMMATICAL_SCORE]
    assert UNGRAMMATICAL_SCORE < -4.0  # the lowest a grammatical review can score: four negative adjectives
    assert judge.name == "toy"


def test_callable_judge_gets_each_prompt_and_its_completions_and_its_scores_pick_the_pair():
    CALLS.clear()
    judge = load_judge("test_online:shortest_wins")
    assert len(CALLS) == 1  # tried once on a sample when it loads: a wrong signature fails before any model loads
    CALLS.clear()
    prompts = ["a", [{"role": "user", "content": "b"}]]
    completions = [["xx", "x", "xxx"], ["yyyy", "yy"]]
    assert judge(prompts, completions) == [[-2.0, -1.0, -3.0], [-4.0, -2.0]]
    assert CALLS == [("a", ["xx", "x", "xxx"]), ([{"role": "user", "content": "b"}], ["yyyy", "yy"])]
    assert judge.name == "test_online:shortest_wins"

    # sample j of a prompt is token 10 + j repeated once per character
    samples = [[Sample([10 + j] * len(t), t, False) for j, t in enumerate(group)] for group in completions]
    pairs, _ = build_pairs(chatml_tokenizer(), prompts, samples, judge(prompts, completions), max_length=64)
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([11], [12, 12, 12]), ([11, 11], [10, 10, 10, 10])]


@pytest.mark.parametrize(
    "spec",
    ["nocolon", ":f", "lora_dpo.toy:", "no_such_module_xyz:f", "lora_dpo.toy:missing", "test_online:NOT_CALLABLE",
     "reward_model:", "reward_model:/no/such/folder"],
)  # fmt: skip
def test_a_bad_judge_spec_is_one_clear_error_naming_the_key(spec):
    with pytest.raises(ConfigError, match=r"^online\.judge: ") as err:
        load_judge(spec)
    assert "\n" not in str(err.value)


def test_check_judge_spec_fails_fast_without_loading_a_model():
    check_judge_spec("toy")
    check_judge_spec("test_online:shortest_wins")
    check_judge_spec("reward_model:/loaded/only/by/load_judge")
    with pytest.raises(ConfigError, match="online.judge"):
        check_judge_spec("no_such_module_xyz:f")


@pytest.mark.parametrize(
    "fn, shown",
    [("one_score_short", "[1.0]"), ("returns_text", "'good'"), ("returns_nan", "nan"), ("returns_none", "None")],
)
def test_a_judge_that_returns_the_wrong_thing_is_named_with_what_it_returned(fn, shown):
    with pytest.raises(ConfigError, match=r"^online\.judge: test_online:" + fn) as err:
        load_judge(f"test_online:{fn}")  # tried on a sample as it loads, before any model does
    assert shown in str(err.value)
    judge = CallableJudge(getattr(sys.modules["test_online"], fn), f"test_online:{fn}")  # and checked at every call
    with pytest.raises(ConfigError, match=r"^online\.judge: test_online:" + fn) as err:
        judge(["p"], [["a", "b"]])
    assert shown in str(err.value)


def test_a_judge_may_return_a_tensor():
    assert load_judge("test_online:returns_tensor")(["p"], [["a", "b", "c"]]) == [[0.0, 1.0, 2.0]]


# ---------------------------------------------------------------------------------------------- reward model


def save_reward_model(folder, tokenizer, num_labels=1, pad=True):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id if pad else None,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a head big enough that texts score visibly differently
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_scores(folder, texts, add_special_tokens):
    """Each text alone through the saved model: no padding, no batching."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = [tok(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        return [float(model(input_ids=torch.tensor([row])).logits[0, 0]) for row in ids]


def test_reward_model_judge_scores_the_chat_rendered_conversation_as_the_model_does(tmp_path, tok_chatml):
    folder = save_reward_model(tmp_path / "rm", tok_chatml)
    judge = load_judge(f"reward_model:{folder}", device="cpu", batch_size=4)
    prompts = ["the movie was", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review"}]]
    completions = [["great", "dull and the music was boring .", "ok"], ["wonderful acting", "no"]]
    scores = judge(prompts, completions)  # 5 texts of different lengths in batches of 4: padding is exercised

    user = "<|im_start|>user\nthe movie was<|im_end|>\n"
    system_user = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nreview<|im_end|>\n"
    texts = [f"{user}<|im_start|>assistant\n{c}<|im_end|>\n" for c in completions[0]]
    texts += [f"{system_user}<|im_start|>assistant\n{c}<|im_end|>\n" for c in completions[1]]
    expected = direct_scores(folder, texts, add_special_tokens=False)
    assert [s for group in scores for s in group] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 5  # the scores tell the texts apart, so a mix-up would show
    assert not judge.model.training and judge.name == f"reward_model:{folder}"


def test_reward_model_without_template_or_pad_token_reads_prompt_space_completion(tmp_path, tok_plain):
    folder = save_reward_model(tmp_path / "rm", tok_plain, pad=False)
    judge = load_judge(f"reward_model:{folder}", device="cpu")
    scores = judge(["the movie was"], [["great .", "dull ."]])
    expected = direct_scores(folder, ["the movie was great .", "the movie was dull ."], add_special_tokens=True)
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_a_model_that_is_not_a_reward_model_is_refused(tmp_path, tok_chatml, tiny_qwen2):
    two = save_reward_model(tmp_path / "two", tok_chatml, num_labels=2)
    with pytest.raises(ConfigError, match=r"^online\.judge: .* 2 output labels"):
        load_judge(f"reward_model:{two}", device="cpu")
    with pytest.raises(ConfigError, match=r"^online\.judge: "):  # a causal LM: no trained score head
        load_judge(f"reward_model:{tiny_qwen2}", device="cpu")


# ------------------------------------------------------------------------------------------------- sampling


def test_sampling_gives_k_per_prompt_is_reproducible_for_a_seed_and_leaves_rng_and_mode_alone(policy):
    model, tok = policy
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample_completions(model, tok, PROMPTS, 3, seed=7, **SAMPLING)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    assert [len(group) for group in a] == [3, 3, 3]
    assert a == sample_completions(model, tok, PROMPTS, 3, seed=7, **SAMPLING)
    assert a != sample_completions(model, tok, PROMPTS, 3, seed=8, **SAMPLING)
    assert len({tuple(s.ids) for group in a for s in group}) > 1  # k samples of one prompt are drawn, not copied
    model.eval()
    sample_completions(model, tok, PROMPTS[:1], 2, seed=7, **SAMPLING)
    assert not model.training


def test_a_sample_without_eos_keeps_all_generated_tokens_and_gets_no_eos(policy):
    model, tok = policy
    samples = [s for group in sample_completions(model, tok, PROMPTS, 4, seed=0, **SAMPLING) for s in group]
    unfinished = [s for s in samples if not s.finished]
    assert unfinished  # the random model rarely says EOS within 6 tokens
    for s in unfinished:
        assert len(s.ids) == SAMPLING["max_new_tokens"] and tok.eos_token_id not in s.ids
        assert s.text == tok.decode(s.ids, skip_special_tokens=True).strip()


def test_samples_keep_the_generated_ids_up_to_and_including_the_first_eos(toy_policy):
    model, tok = toy_policy
    prompts = toy_prompts(3)
    (greedy,) = zip(*sample_completions(model, tok, prompts, 1, max_new_tokens=40, temperature=0, top_p=1.0, seed=0))
    for prompt, s in zip(prompts, greedy):
        p = encode_prompt(tok, prompt)
        model.eval()  # as sample_completions does (train mode with gradient checkpointing breaks the KV cache)
        direct = model.generate(
            input_ids=torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(p):].tolist()  # fmt: skip
        model.train()
        assert s.finished and s.ids == direct[: direct.index(tok.eos_token_id) + 1]
        assert s.ids.count(tok.eos_token_id) == 1 and s.ids[-1] == tok.eos_token_id
        # the toy tokenizer round-trips, so here the text re-encodes to the same ids, as training would see them
        assert s.ids == encode_completion(tok, s.text)


def test_max_length_cuts_samples_before_the_judge_reads_them(toy_policy):
    model, tok = toy_policy
    prompts = toy_prompts(2)
    room = 30 - len(encode_prompt(tok, prompts[0]))  # toy prompts are 10-14 tokens, reviews up to 25
    samples = sample_completions(model, tok, prompts[:1], 4, max_new_tokens=40, temperature=1.0, top_p=1.0, seed=0,
                                 max_length=30)  # fmt: skip
    full = sample_completions(model, tok, prompts[:1], 4, max_new_tokens=40, temperature=1.0, top_p=1.0, seed=0)
    for cut, whole in zip(samples[0], full[0]):
        assert cut.ids == whole.ids[:room]
        assert cut.text == tok.decode(cut.ids, skip_special_tokens=True).strip()
    assert any(len(s.ids) == room and not s.finished for s in samples[0])


# -------------------------------------------------------------------------------------------------- pairing


def test_build_pairs_takes_best_and_worst_skips_ties_and_keeps_the_sampled_ids(tok_chatml):
    prompts = ["p0", [{"role": "user", "content": "p1"}], "p2", "p3"]

    def s(*ids, finished=True):
        return Sample(ids=list(ids), text=f"t{ids}", finished=finished)

    samples = [
        [s(1, 9), s(2, 9), s(3, 9)],  # best 2 (score 5), worst 1 (score -1)
        [s(4, 9), s(5, 9)],  # tie: no pair
        [s(6, 9), s(6, 9)],  # identical ids scored apart (a judge that is not deterministic): no pair
        [s(7, 8, 7, finished=False), s(8, 9)],  # unfinished chosen kept without EOS
    ]
    scores = [[0.0, -1.0, 5.0], [2.0, 2.0], [1.0, 0.0], [3.0, 1.0]]
    pairs, stats = build_pairs(tok_chatml, prompts, samples, scores, max_length=64, indices=[10, 11, 12, 13])
    assert [(p.index, p.chosen_ids, p.rejected_ids) for p in pairs] == [(10, [3, 9], [2, 9]), (13, [7, 8, 7], [8, 9])]
    assert [p.prompt_ids for p in pairs] == [encode_prompt(tok_chatml, "p0"), encode_prompt(tok_chatml, "p3")]
    assert pairs[0].prompt == "p0"
    # 9 samples; scores sum to 13; distinct per prompt 3+2+1+2 = 8; finished 8 of 9; tokens 2*8 + 3 = 19
    assert stats == {
        "online/prompts": 4, "online/pairs": 2, "online/ties": 1, "online/identical": 1,
        "online/score": pytest.approx(13 / 9), "online/score_chosen": 4.0, "online/score_rejected": 0.0,
        "online/distinct": pytest.approx(8 / 9), "online/finished": pytest.approx(8 / 9),
        "online/length": pytest.approx(19 / 9),
    }  # fmt: skip


def test_build_pairs_truncates_like_the_offline_data(tok_llama3):
    prompt = "write a short review of the film night train . " * 6
    full = encode_prompt(tok_llama3, prompt)
    assert full[0] == tok_llama3.bos_token_id and len(full) > 20
    chosen, rejected = list(range(100, 130)), list(range(200, 230))
    samples = [[Sample(chosen, "c", False), Sample(rejected, "r", False)]]
    (pair,), _ = build_pairs(tok_llama3, [prompt], samples, [[1.0, 0.0]], max_length=40, max_prompt_length=16)
    cfg = DataConfig(train="rows", max_length=40, max_prompt_length=16)
    expected = _truncate(full, chosen, rejected, cfg, tok_llama3.bos_token_id)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == expected[:3]
    assert pair.prompt_ids[0] == tok_llama3.bos_token_id and len(pair.prompt_ids) == 16
    assert pair.prompt_ids == prompt_ids(tok_llama3, prompt, 16)
    # the default prompt budget is half of max_length, as in data.build_datasets
    (pair,), _ = build_pairs(tok_llama3, [prompt], samples, [[1.0, 0.0]], max_length=40)
    assert len(pair.prompt_ids) == 20 and len(pair.chosen_ids) == 20


def test_online_pairs_on_the_toy_world_prefer_the_more_positive_review(toy_policy):
    model, tok = toy_policy
    prompts = toy_prompts(6)
    pairs, stats = online_pairs(model, tok, prompts, load_judge("toy"), k=4, max_new_tokens=40, temperature=1.0,
                                top_p=1.0, seed=3, max_length=96)  # fmt: skip
    assert stats["online/pairs"] == len(pairs) >= 4 and stats["online/prompts"] == 6
    assert stats["online/score_chosen"] > stats["online/score_rejected"]
    for pair in pairs:
        chosen = tok.decode(pair.chosen_ids, skip_special_tokens=True)
        rejected = tok.decode(pair.rejected_ids, skip_special_tokens=True)
        assert is_grammatical(chosen)
        assert sentiment_score(chosen) >= sentiment_score(rejected) or not is_grammatical(rejected)
        assert pair.prompt_ids == encode_prompt(tok, prompts[pair.index])
        assert pair.chosen_ids[-1] == tok.eos_token_id


def test_online_pairs_refuses_settings_that_cannot_make_pairs(policy):
    model, tok = policy
    judge = load_judge("toy")
    common = dict(max_new_tokens=4, top_p=1.0, seed=0, max_length=64)
    with pytest.raises(ValueError, match="k >= 2"):
        online_pairs(model, tok, PROMPTS, judge, k=1, temperature=1.0, **common)
    with pytest.raises(ValueError, match="temperature"):
        online_pairs(model, tok, PROMPTS, judge, k=2, temperature=0.0, **common)


def test_sampling_is_the_policy_distribution_without_transformers_default_top_k(policy):
    model, tok = policy
    model.eval()
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([encode_prompt(tok, "the movie was")])).logits[0, -1].softmax(-1)
    model.train()
    top50 = set(probs.topk(50).indices.tolist())
    assert 1 - probs[list(top50)].sum() > 0.3  # this policy puts much of its mass beyond its 50 likeliest tokens
    (first_tokens,) = sample_completions(model, tok, ["the movie was"], 16, max_new_tokens=1, temperature=1.0,
                                         top_p=1.0, seed=0)  # fmt: skip
    # with transformers' global default top_k=50 every one of these would lie in top50
    assert any(s.ids[0] not in top50 for s in first_tokens)
