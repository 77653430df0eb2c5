"""`rewards/*` mean what TRL's mean, for every loss: on one batch, lora-dpo's IPO and length-normalised DPO give
TRL 1.16's loss and its rewards/chosen, rejected, margins and accuracies (beta times the log-ratio summed over the
completion); the per-token rewards those losses optimise are logged apart, as rewards_per_token/*."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo.config import load_recipe
from lora_dpo.data.batches import collate, forward_inputs
from lora_dpo.data.pairs import build_datasets
from lora_dpo.methods.preference import PreferenceMethod
from lora_dpo.model.wrapped import PolicyLogps

trl = pytest.importorskip("trl", reason="the `dev` extra installs trl (the parity reference)")
import datasets  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROWS = [{"prompt": [{"role": "user", "content": f"write a short review of the film night train {i} ."}],
         "chosen": [{"role": "assistant", "content": "the movie was great and the acting was wonderful . " * (i + 1)}],
         "rejected": [{"role": "assistant", "content": "the plot was dull" + " ." * (3 - i)}]} for i in range(4)]


@pytest.fixture(scope="module")
def models(tiny_qwen2):
    """A policy moved off the reference (so that rewards are not zero) and the reference, in fp32."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    policy = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy.train(), reference


def trl_metrics(tok, policy, reference, loss_type, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True, loss_type=[loss_type],
                     beta=0.1, per_device_train_batch_size=len(ROWS), max_length=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    with torch.no_grad():
        loss = trainer.compute_loss(policy, batch)
    return float(loss), {k: v[0] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}


def our_metrics(tok, policy, reference, overrides, tiny_qwen2, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_qwen2}", f"data.train={data}",
                                "data.eval_fraction=0", "loss.beta=0.1", *overrides])
    pairs, _, _ = build_datasets(recipe.data, tok, seed=0)
    method = PreferenceMethod(recipe, tok)
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        ref, _ = PolicyLogps(reference)(**forward_inputs(batch))
        table = torch.stack([ref[: len(pairs)], ref[len(pairs):]], dim=1)  # [B, 2]: chosen, rejected
        stats = method.Stats()
        loss = method.pair_losses(PolicyLogps(policy), batch, table, 0.1, stats)
    return float(loss), stats.means()


@pytest.mark.parametrize("ours, theirs", [(["loss.name=ipo"], "ipo"),
                                          (["loss.name=dpo", "loss.length_normalize=true"], "sigmoid_norm")])
def test_loss_and_rewards_equal_trls_on_one_batch(models, tiny_qwen2, tmp_path, ours, theirs):
    tok, policy, reference = models
    trl_loss, expected = trl_metrics(tok, policy, reference, theirs, tmp_path)
    loss, got = our_metrics(tok, policy, reference, ours, tiny_qwen2, tmp_path)
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert set(expected) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the per-token rewards the loss optimises: the summed ones over each completion's length, logged apart
    per_token = [got[f"rewards_per_token/{k}"] for k in ("chosen", "rejected")]
    assert per_token != [got["rewards/chosen"], got["rewards/rejected"]]
    assert abs(per_token[0]) < abs(got["rewards/chosen"])  # a mean over the chosen reply's > 10 tokens
