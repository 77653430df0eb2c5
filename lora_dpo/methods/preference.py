"""Offline preference pairs: DPO and every other paired loss of the registry (core/losses.py), against a
reference or, for SimPO and ORPO, without one."""

from __future__ import annotations

import torch

from ..core.losses import LOSSES, chosen_nll, implicit_rewards, preference_loss
from ..core.stats import PairStats
from ..data.batches import collate_for, forward_inputs, move, to_device
from ..data.pairs import build_datasets
from ..model.adapters import reference_model
from ..model.layout import Layout
from ..model.wrapped import policy_of
from .base import Method, StepContext


class PreferenceMethod(Method):
    """Pairs, one concatenated forward of [chosen; rejected] (or shared-prompt rows) per micro-batch."""

    def __init__(self, recipe, tokenizer, layout: Layout = Layout(False)):
        super().__init__(recipe, tokenizer, layout)
        if self.spec.needs_reference and self.length_normalized():  # the rewards it optimises, logged too
            self.Stats = self.Stats.per_token()

    @property
    def spec(self):
        return LOSSES[self.recipe.loss.name]

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    @classmethod
    def build(cls, cfg, tokenizer, seed):
        return build_datasets(cfg, tokenizer, seed)

    def collate(self, items: list) -> dict:
        return collate_for(self.layout.shared)(items, self.pad_id)

    def loss(self, model, items, positions, reference, ctx: StepContext, stats) -> torch.Tensor:
        batch = to_device(self.collate(items), ctx.device)
        return self.pair_losses(model, batch, reference, ctx.beta, stats)

    def length_normalized(self) -> bool:
        """On mean log-probs per token: the loss's own choice, or loss.length_normalize for a loss with a
        reference (SimPO and ORPO are defined on means)."""
        cfg, spec = self.recipe.loss, self.spec
        return spec.length_normalized if cfg.length_normalize is None or not spec.needs_reference else cfg.length_normalize

    def pair_losses(self, model, batch: dict, ref_sums: torch.Tensor | None, beta: float, stats: PairStats) -> torch.Tensor:
        """Mean loss of one batch of pairs: one forward of [chosen; rejected] through `model` (a prepared
        `PolicyLogps`); the reference from the precomputed [B, 2] table `ref_sums`, or a no-grad reference pass
        when it is None and the loss needs one. Adds the batch's metrics to `stats`."""
        cfg, spec = self.recipe.loss, self.spec
        sums, counts = model(**forward_inputs(batch))
        b = sums.shape[0] // 2
        tokens = batch["attention_mask"].sum()
        ref = None
        if spec.needs_reference:
            if ref_sums is None:
                with reference_model(policy_of(model)):
                    ref, _ = model(**forward_inputs(batch))
            else:
                ref = move(ref_sums.T.reshape(-1), sums.device)  # [B, 2] -> [chosen..., rejected...]
        normalized = self.length_normalized()
        if normalized:
            safe = counts.clamp(min=1)
            pol, rf = sums / safe, (ref / safe if ref is not None else None)
        else:
            pol, rf = sums, ref
        options = {key: getattr(cfg, key) for key in spec.options}  # the loss.* keys the loss reads
        out = preference_loss(cfg.name, pol[:b], pol[b:], rf[:b] if rf is not None else None,
                              rf[b:] if rf is not None else None, beta, **options)
        loss = out.losses
        if ref is None:  # no reference: no log-ratio on the data, so no kl
            stats.add(loss, out.chosen_rewards, out.rejected_rewards, sums[:b], sums[b:], 0.0, 0.0, tokens)
            return loss.mean()
        if cfg.rpo_alpha > 0:
            loss = loss + cfg.rpo_alpha * chosen_nll(sums[:b], counts[:b])
        kl_num = (sums.detach() - ref).sum()
        # rewards/* as TRL logs them for every loss: beta x the summed log-ratio; a loss on per-token means also
        # logs the rewards it optimises, as rewards_per_token/*
        chosen, rejected = implicit_rewards(sums[:b], ref[:b], beta), implicit_rewards(sums[b:], ref[b:], beta)
        per_token = (out.chosen_rewards, out.rejected_rewards) if normalized else None
        stats.add(loss, chosen, rejected, sums[:b], sums[b:], kl_num, counts.sum(), tokens, per_token=per_token)
        return loss.mean()
