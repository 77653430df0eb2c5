"""Supervised fine-tuning on responses (`stage: sft`): the mean negative log-likelihood of the completion tokens;
the prompt carries no loss. An SFT run's adapter is where DPO starts, and its reference."""

from __future__ import annotations

import torch

from ..core.stats import SFTStats
from ..data.batches import collate_completions, forward_inputs, to_device
from ..data.examples import build_completion_datasets
from .base import Method, StepContext


class SFTMethod(Method):
    unit = "example"
    Stats = SFTStats

    @property
    def needs_reference(self) -> bool:
        return False

    @classmethod
    def build(cls, cfg, tokenizer, seed):
        return build_completion_datasets(cfg, tokenizer, seed, labelled=False)

    def collate(self, items: list) -> dict:
        return collate_completions(items, self.pad_id)

    def loss(self, model, items, positions, reference, ctx: StepContext, stats: SFTStats) -> torch.Tensor:
        """Mean NLL per completion token of the micro-batch (the prompt tokens carry no loss)."""
        batch = to_device(self.collate(items), ctx.device)
        sums, counts = model(**forward_inputs(batch))
        total, tokens = -sums.sum(), counts.sum()
        stats.add_sums(len(items), batch["attention_mask"].sum(), {}, {"loss": (total.detach(), tokens)})
        return total / tokens.clamp(min=1)
