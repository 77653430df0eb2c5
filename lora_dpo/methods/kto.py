"""KTO on unpaired good/bad examples (an unpaired loss of the registry, core/losses.py): each example's log-ratio
against the batch's KL reference point z0, estimated on mismatched prompt/completion examples."""

from __future__ import annotations

import torch

from ..core.losses import LOSSES, kto_reference_point
from ..core.stats import KTOStats
from ..data.batches import collate_completions, forward_inputs, move, to_device
from ..data.examples import build_completion_datasets, mismatched
from ..model.adapters import reference_model
from ..model.wrapped import policy_of
from .base import Method, StepContext


class KTOMethod(Method):
    unit = "example"
    Stats = KTOStats
    reference_width = 1

    @classmethod
    def build(cls, cfg, tokenizer, seed):
        return build_completion_datasets(cfg, tokenizer, seed, labelled=True)

    def collate(self, items: list) -> dict:
        return collate_completions(items, self.pad_id)

    def loss(self, model, items, positions, reference, ctx: StepContext, stats: KTOStats) -> torch.Tensor:
        cfg, spec = self.recipe.loss, LOSSES[self.recipe.loss.name]
        batch = to_device(self.collate(items), ctx.device)
        sums, _ = model(**forward_inputs(batch))
        peft_model = policy_of(model)
        if reference is None:
            with reference_model(peft_model):
                ref, _ = model(**forward_inputs(batch))
        else:
            ref = move(reference, sums.device)
        # the reference point z0 from this batch's mismatched examples, without gradient (KTO paper, TRL)
        kl_batch = forward_inputs(to_device(self.collate(mismatched(items, self.recipe.data.max_length)), ctx.device))
        with torch.no_grad():
            kl_policy, _ = model(**kl_batch)
            with reference_model(peft_model):
                kl_ref, _ = model(**kl_batch)
        z0 = kto_reference_point(kl_policy, kl_ref)
        good = batch["desirable"]
        options = {key: getattr(cfg, key) for key in spec.options}
        losses = spec.fn(sums, ref, good, z0, ctx.beta, **options)
        rewards = (ctx.beta * (sums - ref)).detach()
        n, n_good = len(items), good.sum()
        stats.add_sums(n, batch["attention_mask"].sum(), {"loss": losses.detach().sum()}, {
            "rewards/chosen": (rewards[good].sum(), n_good),
            "rewards/rejected": (rewards[~good].sum(), n - n_good),
            "logps/chosen": (sums[good].detach().sum(), n_good),
            "logps/rejected": (sums[~good].detach().sum(), n - n_good),
            "kl": (z0 * n, n),
        })
        return losses.mean()
