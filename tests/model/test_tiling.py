"""Tiled MLP (`train.mlp_chunks`): the same log-probs and LoRA gradients as the whole MLP, a lower peak, and a
run that trains with it."""

from pathlib import Path

import pytest
import torch

from lora_dpo.config import LoraConfig, ModelConfig
from lora_dpo.data.batches import collate

from lora_dpo.core.logps import sequence_logps
from lora_dpo.memory.track import peak_memory
from lora_dpo.model.adapters import load_policy
from lora_dpo.model.tiling import tile_mlps


def logps_and_grads(policy, batch, chunks):
    tile_mlps(policy, chunks)
    policy.zero_grad(set_to_none=True)
    with peak_memory() as peak:  # (small head chunks, so that the decoder's backward sets the peak)
        sums = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], 64).sums
        sums.sum().backward()
    with torch.no_grad():  # the reference pass: no graph, slices only bound the transient
        ref = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sums
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return sums.detach(), ref, grads, peak.bytes


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_gives_the_same_logps_and_gradients_and_a_lower_peak(calibration_model, checkpointing):
    folder, pairs = calibration_model
    policy = load_policy(ModelConfig(name=str(folder), gradient_checkpointing=checkpointing),
                         LoraConfig(r=8, dropout=0.0), torch.device("cpu"))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():  # B != 0, so that every LoRA parameter gets a gradient
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    policy.train()
    batch = collate(pairs[:4], pad_id=0)
    whole = logps_and_grads(policy, batch, 1)
    tiled = logps_and_grads(policy, batch, 4)
    again = logps_and_grads(policy, batch, 1)  # tile_mlps(.., 1) puts the MLPs back as they were
    torch.testing.assert_close(tiled[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled[1], whole[1], rtol=0, atol=1e-5)
    assert whole[2] and all(g.abs().sum() > 0 for g in whole[2].values())
    for name in whole[2]:
        scale = whole[2][name].abs().max()  # slices sum a gradient in another order: float error, relative to it
        torch.testing.assert_close(tiled[2][name], whole[2][name], rtol=0, atol=1e-4 * float(scale))
    assert again[3] == whole[3]
    # the MLP holds [tokens, 768] intermediates; in slices of a quarter the peak drops by a good part of them
    tokens = batch["input_ids"].numel()
    assert whole[3] - tiled[3] > tokens * 768 * 4 * 2


def test_a_run_trains_with_a_tiled_mlp(tmp_path):
    from lora_dpo.config import load_recipe
    from lora_dpo.run.metrics import read_metrics
    from lora_dpo.training.loop import train

    toy = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
    recipe = load_recipe(str(toy), [f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                              "train.mlp_chunks=3", "eval.num_prompts=2", "eval.max_pairs=8"])
    train(recipe)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
