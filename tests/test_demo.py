"""The Quickstart's demo, end to end: the toy recipe trains a LoRA on the 4-bit toy base and DPO measurably
moves the model toward the preferred behaviour (more positive reviews), judged on held-out prompts."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo.config import load_recipe
from lora_dpo.model.sampling import generate
from lora_dpo.toy import is_grammatical, positive_share, toy_model_path
from lora_dpo.training.loop import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy.yaml"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    # the recipe as shipped, minus periodic evaluation and checkpoints (the final ones still run)
    final = train(load_recipe(RECIPE, [f"output_dir={out}", "train.eval_every=null", "train.save_every=null"]))
    return out, final


def test_toy_recipe_raises_behaviour_score_and_reward_accuracy(toy_run):
    out, final = toy_run
    saved = json.loads((out / "eval.json").read_text())
    assert saved == final
    before, after = final["baseline"]["behaviour"], final["behaviour"]
    assert 0.15 < before < 0.55  # the base's reviews are positive, negative or neutral in about equal shares
    assert after > before + 0.3, (before, after)  # measured 0.348 -> 0.914
    assert final["rewards/accuracies"] > 0.8  # held-out pairs, chance is 0.5; measured 0.925
    assert final["rewards/margins"] > 0
    assert final["pairs"] == 200 and final["skipped_steps"] == 0


def test_toy_adapter_loads_with_plain_peft_and_writes_more_positive_reviews(toy_run):
    out, final = toy_run
    base_path = toy_model_path()
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out / "adapter")
    prompts = [f"write a review of the {w} river ." for w in ("night", "silver", "last", "hidden")] * 8
    tuned = generate(model, tok, prompts, max_new_tokens=48, seed=1)
    reference = generate(model, tok, prompts, adapter=False, max_new_tokens=48, seed=1)
    score = lambda texts: sum(map(positive_share, texts)) / len(texts)  # noqa: E731
    grammatical = lambda texts: sum(map(is_grammatical, texts)) / len(texts)  # noqa: E731
    assert score(tuned) > score(reference) + 0.3, (score(reference), score(tuned))
    # pure DPO at the recipe's learning rate moves the sentiment, not the language: no likelihood collapse
    assert grammatical(tuned) >= grammatical(reference) - 0.1, (grammatical(reference), grammatical(tuned))
    assert all(torch.isfinite(p).all() for p in model.parameters())
