"""Training objectives: what one method computes, for the one loop in trainer.py.

An objective owns its data (encoded before any model loads), the reference log-probs it needs (computed in
`prepare`, once per round), the loss of one micro-batch, and its held-out evaluation. The loop owns the rest:
schedule, accumulation, clipping, skipping, logging, checkpoints, rounds, processes.

| objective           | recipe                                   | data                      | reference           |
|---------------------|------------------------------------------|---------------------------|---------------------|
| PreferenceObjective | loss.name dpo, ipo, hinge, robust        | pairs                     | table, or per step  |
|                     | loss.name simpo, orpo                    | pairs                     | none                |
| KTOObjective        | loss.name kto                            | unpaired, labelled        | table + KL per step |
| SFTObjective        | stage: sft                               | prompt + response         | none                |
| OnlineObjective     | online.enabled (online.py)               | prompts; pairs sampled    | per step            |

Every `loss` returns the micro-batch's mean loss and adds its metrics to a `Stats` of the objective's kind.
`beta` is an attribute, not read from the recipe at each step, so that adaptive beta (trainer.py) can steer it.
"""

from __future__ import annotations

import dataclasses

import torch

from . import rundir
from .completions import EncodedExample, build_completion_datasets, collate_completions, mismatched
from .config import REFERENCE_FREE, Recipe
from .data import EncodedPair, build_datasets
from .distributed import policy_of, reduce_stats, shards
from .logps import SequenceLogps
from .losses import (LENGTH_NORMALIZED_BY_DEFAULT, chosen_nll, kto_loss, kto_reference_point, orpo_loss,
                     preference_loss, simpo_loss)
from .metrics import PairStats, Stats
from .model import reference_model
from .shared_prompt import collate_for, fallback_notice, forward_inputs, use_shared_prompt


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class Objective:
    unit = "pair"  # what one training example is (pairs_per_s counts these)
    Stats: type[Stats] = PairStats
    uses_reference = True  # False: no reference pass at all (SimPO, ORPO, SFT)
    shared = False  # pairs laid out as shared-prompt rows (shared_prompt.py)

    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.beta = recipe.loss.beta
        self.step = 0  # the optimizer step being taken (set by the loop)
        # what the reference is, for the reference cache's key: None for the bare base, else the digest of
        # the reference adapter (a start adapter, or a round's snapshot; set by the loop)
        self.reference_adapter: str | None = None
        if recipe.model.adapter:
            from .model import resolve_adapter
            from .refcache import adapter_fingerprint

            self.reference_adapter = adapter_fingerprint(resolve_adapter(recipe.model.adapter))
        self.train: list = []
        self.eval: list = []
        self.report = None
        self.notices: list[str] = []  # for the run's log

    # -- what the loop asks of every objective
    def prepare(self, model, accelerator) -> None:
        """Compute what stays fixed while the reference does (reference log-probs); called again when the
        reference changes (a new round of iterative DPO)."""

    def loss(self, model, positions: list[int], stats: Stats, device) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, accelerator) -> dict:
        raise NotImplementedError

    def prompts(self, split: str) -> list:
        """The prompts of the split's examples, in order (for sampling: behaviour score, diversity, KL)."""
        return [e.prompt for e in (self.eval if split == "eval" else self.train)]

    def fingerprints(self) -> dict:
        name = self.recipe.model.name
        return {"train": rundir.data_fingerprint(self.train, name), "eval": rundir.data_fingerprint(self.eval, name)}

    def load_train(self, source: str) -> list:
        """The training examples of another source (a later round's data), tokenised as data.train is."""
        cfg = dataclasses.replace(self.recipe.data, train=source, eval=None, eval_fraction=0.0)
        return self._build(cfg)[0]

    def _build(self, cfg) -> tuple:
        raise NotImplementedError

    def set_train(self, items: list) -> None:
        """New training data (a round of iterative DPO with its own data)."""
        self.train = items

    # -- shared machinery
    def _reference_table(self, model, items: list, collate_fn, accelerator, width: int) -> torch.Tensor:
        """[len(items), width] summed log pi_ref of each item's sequences (width 2 for pairs: chosen, rejected),
        computed with the reference model in eval batches split across processes and summed back together."""
        out = torch.zeros(len(items), width)
        model.eval()
        bs = self.recipe.eval.batch_size
        for idx, ghost in shards(len(items), bs, accelerator.process_index, accelerator.num_processes):
            b = to_device(collate_fn([items[i] for i in idx]), accelerator.device)
            with reference_model(policy_of(model)):
                sums, _ = model(**forward_inputs(b))
            if not ghost:
                out[idx[0] : idx[-1] + 1] = sums.view(width, -1).T.cpu()
        if accelerator.num_processes > 1:
            out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
        return out

    def _evaluate_batches(self, model, accelerator, step) -> dict:
        model.eval()
        stats = self.Stats()
        for idx, ghost in shards(len(self.eval), self.recipe.eval.batch_size, accelerator.process_index,
                                 accelerator.num_processes):
            step(idx, self.Stats() if ghost else stats)
        return reduce_stats(accelerator, stats).means()


class PreferenceObjective(Objective):
    """Offline preference pairs: DPO and its relatives against a reference, or SimPO / ORPO without one."""

    def __init__(self, recipe: Recipe, tokenizer, data: tuple | None = None):
        super().__init__(recipe, tokenizer)
        self.uses_reference = recipe.loss.name not in REFERENCE_FREE
        self.train, self.eval, self.report = data or self._build(recipe.data)
        self.eval = self.eval[: recipe.eval.max_pairs or None]
        self.ref_train: torch.Tensor | None = None
        self.ref_eval: torch.Tensor | None = None
        self.shared, why_not = use_shared_prompt(recipe)
        if why_not:
            self.notices.append(fallback_notice(why_not))
        self.collate_fn = collate_for(self.shared)  # plain [prompt+chosen; prompt+rejected] or shared rows

    def set_shared(self, shared: bool) -> None:
        self.shared = shared
        self.collate_fn = collate_for(shared)

    def _build(self, cfg) -> tuple:
        return build_datasets(cfg, self.tokenizer, self.recipe.train.seed)

    def _collate(self, pairs: list[EncodedPair]) -> dict:
        return self.collate_fn(pairs, self.pad_id)

    def prepare(self, model, accelerator) -> None:
        """The reference tables, from the on-disk cache when their fingerprint matches (refcache.py), else one
        pass in length order (less padding)."""
        if not self.uses_reference:
            return
        from .grouping import in_length_order
        from .refcache import ReferenceCache

        cache = ReferenceCache.for_run(self.recipe, self.tokenizer, policy_of(model), accelerator.device, accelerator,
                                       reference_adapter=self.reference_adapter)

        def table(pairs):
            compute = lambda ps: self._reference_table(model, ps, self._collate, accelerator, 2)  # noqa: E731
            return cache.table(pairs, lambda: in_length_order(compute, pairs, self.shared))

        if self.recipe.train.precompute_reference:
            self.ref_train = table(self.train)
        self.ref_eval = table(self.eval) if self.eval else None

    def loss(self, model, positions, stats, device):
        batch = to_device(self._collate([self.train[i] for i in positions]), device)
        ref = self.ref_train[positions] if self.ref_train is not None else None
        return self.pair_losses(model, batch, ref, stats)

    def evaluate(self, model, accelerator) -> dict:
        def step(idx, stats):
            batch = to_device(self._collate([self.eval[i] for i in idx]), accelerator.device)
            self.pair_losses(model, batch, self.ref_eval[idx] if self.ref_eval is not None else None, stats)

        return self._evaluate_batches(model, accelerator, step)

    def pair_losses(self, model, batch: dict, ref_sums: torch.Tensor | None, stats: PairStats) -> torch.Tensor:
        """Mean loss of one batch of pairs: one concatenated forward of [chosen; rejected] through `model` (a
        prepared `PolicyLogps`); the reference from the precomputed [B, 2] table `ref_sums`, or a no-grad
        reference pass when it is None. Adds the batch's metrics to `stats`."""
        cfg = self.recipe.loss
        policy = SequenceLogps(*model(**forward_inputs(batch)))
        b = policy.sums.shape[0] // 2
        counts = policy.counts.clamp(min=1)
        tokens = batch["attention_mask"].sum()
        if not self.uses_reference:
            avg = policy.sums / counts
            if cfg.name == "simpo":
                losses = simpo_loss(avg[:b], avg[b:], self.beta, cfg.simpo_gamma)
            else:
                losses = orpo_loss(avg[:b], avg[b:], self.beta)
            rewards = (self.beta * avg).detach()  # the implicit rewards of both: beta x mean log-prob
            stats.add(losses, rewards[:b], rewards[b:], policy.sums[:b], policy.sums[b:], 0.0, 0.0, tokens)
            return losses.mean()
        if ref_sums is None:
            with reference_model(policy_of(model)):
                ref, _ = model(**forward_inputs(batch))
        else:
            ref = ref_sums.T.reshape(-1).to(policy.sums.device)  # [B, 2] -> [chosen..., rejected...]
        norm = cfg.length_normalize
        if norm is None:
            norm = cfg.name in LENGTH_NORMALIZED_BY_DEFAULT
        pol, rf = (policy.sums / counts, ref / counts) if norm else (policy.sums, ref)
        out = preference_loss(cfg.name, pol[:b], pol[b:], rf[:b], rf[b:], self.beta, cfg.label_smoothing)
        loss = out.losses
        if cfg.rpo_alpha > 0:
            loss = loss + cfg.rpo_alpha * chosen_nll(policy.sums[:b], policy.counts[:b])
        kl_num = (policy.sums.detach() - ref).sum()
        stats.add(loss, out.chosen_rewards, out.rejected_rewards, policy.sums[:b], policy.sums[b:],
                  kl_num, policy.counts.sum(), tokens)
        return loss.mean()


# ------------------------------------------------------------------------------------------------ KTO


class KTOStats(Stats):
    """Unpaired examples: rewards and log-probs averaged over the desirable (chosen) and undesirable (rejected)
    examples separately, and the KL reference point z0 averaged over examples."""

    SUMMED = ("loss",)
    RATIOS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")

    def means(self) -> dict[str, float]:
        out = super().means()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class KTOObjective(Objective):
    unit = "example"
    Stats = KTOStats

    def __init__(self, recipe: Recipe, tokenizer):
        super().__init__(recipe, tokenizer)
        self.train, self.eval, self.report = self._build(recipe.data)
        self.eval = self.eval[: recipe.eval.max_pairs or None]
        self.ref_train = self.ref_eval = None

    def _build(self, cfg) -> tuple:
        return build_completion_datasets(cfg, self.tokenizer, self.recipe.train.seed, labelled=True)

    def _collate(self, examples: list[EncodedExample]) -> dict:
        return collate_completions(examples, self.pad_id)

    def prepare(self, model, accelerator) -> None:
        if self.recipe.train.precompute_reference:
            self.ref_train = self._reference_table(model, self.train, self._collate, accelerator, 1)[:, 0]
        self.ref_eval = self._reference_table(model, self.eval, self._collate, accelerator, 1)[:, 0] if self.eval else None

    def loss(self, model, positions, stats, device):
        items = [self.train[i] for i in positions]
        ref = self.ref_train[positions] if self.ref_train is not None else None
        return self._losses(model, items, ref, stats, device)

    def evaluate(self, model, accelerator) -> dict:
        def step(idx, stats):
            ref = self.ref_eval[idx] if self.ref_eval is not None else None
            self._losses(model, [self.eval[i] for i in idx], ref, stats, accelerator.device)

        return self._evaluate_batches(model, accelerator, step)

    def _losses(self, model, items, ref_sums, stats: KTOStats, device) -> torch.Tensor:
        cfg = self.recipe.loss
        batch = to_device(self._collate(items), device)
        policy = SequenceLogps(*model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]))
        peft_model = policy_of(model)
        if ref_sums is None:
            with reference_model(peft_model):
                ref, _ = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        else:
            ref = ref_sums.to(policy.sums.device)
        # the reference point z0 from this batch's mismatched examples, without gradient (KTO paper, TRL)
        kl_batch = to_device(self._collate(mismatched(items, self.recipe.data.max_length)), device)
        with torch.no_grad():
            kl_policy, _ = model(kl_batch["input_ids"], kl_batch["attention_mask"], kl_batch["loss_mask"])
            with reference_model(peft_model):
                kl_ref, _ = model(kl_batch["input_ids"], kl_batch["attention_mask"], kl_batch["loss_mask"])
        z0 = kto_reference_point(kl_policy, kl_ref)
        good = batch["desirable"]
        losses = kto_loss(policy.sums, ref, good, z0, self.beta, cfg.desirable_weight, cfg.undesirable_weight)
        rewards = (self.beta * (policy.sums - ref)).detach()
        n, n_good = len(items), int(good.sum())
        stats.add_sums(n, batch["attention_mask"].sum(), {"loss": losses.detach().sum()}, {
            "rewards/chosen": (rewards[good].sum(), n_good),
            "rewards/rejected": (rewards[~good].sum(), n - n_good),
            "logps/chosen": (policy.sums[good].detach().sum(), n_good),
            "logps/rejected": (policy.sums[~good].detach().sum(), n - n_good),
            "kl": (z0 * n, n),
        })
        return losses.mean()


# ------------------------------------------------------------------------------------------------ SFT


class SFTStats(Stats):
    """Supervised fine-tuning: the loss is the mean negative log-likelihood per response token."""

    RATIOS = ("loss",)

    def means(self) -> dict[str, float]:
        import math

        out = super().means()
        if "loss" in out:
            out["ppl"] = math.exp(min(out["loss"], 50.0))  # perplexity of the responses
        return out


class SFTObjective(Objective):
    unit = "example"
    Stats = SFTStats
    uses_reference = False

    def __init__(self, recipe: Recipe, tokenizer):
        super().__init__(recipe, tokenizer)
        self.train, self.eval, self.report = build_completion_datasets(recipe.data, tokenizer, recipe.train.seed,
                                                                      labelled=False)
        self.eval = self.eval[: recipe.eval.max_pairs or None]

    def loss(self, model, positions, stats, device):
        return self._nll(model, [self.train[i] for i in positions], stats, device)

    def evaluate(self, model, accelerator) -> dict:
        return self._evaluate_batches(
            model, accelerator, lambda idx, stats: self._nll(model, [self.eval[i] for i in idx], stats, accelerator.device))

    def _nll(self, model, items, stats: SFTStats, device) -> torch.Tensor:
        """Mean NLL per completion token of the micro-batch (the prompt tokens carry no loss)."""
        batch = to_device(collate_completions(items, self.pad_id), device)
        sums, counts = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        total, tokens = -sums.sum(), counts.sum()
        stats.add_sums(len(items), batch["attention_mask"].sum(), {}, {"loss": (total.detach(), tokens)})
        return total / tokens.clamp(min=1)


# ------------------------------------------------------------------------------------------ online DPO


class OnlineStats(PairStats):
    """PairStats of the pairs trained on, plus the judge's view of every sample: its mean score, and the share
    of prompts that gave no pair (all samples scored alike, or identical)."""

    RATIOS = ("kl", "online/score", "online/no_pair")


class OnlineObjective(PreferenceObjective):
    """Online DPO: each step, the step's prompts (from data.train) are answered `online.samples` times by the
    current policy; the judge's best and worst answers make the step's pairs, and the reference is computed for
    them on the spot. Held-out evaluation uses the offline eval pairs (rewards relative to the reference)."""

    Stats = OnlineStats

    def __init__(self, recipe: Recipe, tokenizer):
        super().__init__(recipe, tokenizer)
        self.judge = None

    def prepare(self, model, accelerator) -> None:
        from .online import load_judge

        if self.judge is None:
            self.judge = load_judge(self.recipe.online.judge, accelerator.device)
        self.ref_eval = self._reference_table(model, self.eval, self._collate, accelerator, 2) if self.eval else None

    def loss(self, model, positions, stats, device):
        from .online import online_pairs

        o, d = self.recipe.online, self.recipe.data
        prompts = [self.train[i].prompt for i in positions]
        pairs, info = online_pairs(
            policy_of(model), self.tokenizer, prompts, self.judge, k=o.samples, max_new_tokens=o.max_new_tokens,
            temperature=o.temperature, top_p=o.top_p, seed=self.recipe.train.seed * 1_000_003 + self.step * 4099 + positions[0],
            max_length=d.max_length, max_prompt_length=d.max_prompt_length, indices=positions,
        )  # fmt: skip
        model.train()
        n = len(prompts) * o.samples
        stats.add_sums(0, 0, {}, {"online/score": (info["online/score"] * n, n),
                                  "online/no_pair": (len(prompts) - len(pairs), len(prompts))})
        if pairs:
            batch = to_device(self._collate(pairs), device)
            return self.pair_losses(model, batch, None, stats)
        # every prompt tied: a forward with zero loss keeps the processes' collective backward in step
        batch = to_device(self._collate([self.train[positions[0]]]), device)
        return 0.0 * self.pair_losses(model, batch, None, self.Stats())


def make_objective(recipe: Recipe, tokenizer) -> Objective:
    """The objective the recipe asks for (see the table at the top of this module)."""
    if recipe.stage == "sft":
        return SFTObjective(recipe, tokenizer)
    if recipe.online.enabled:
        return OnlineObjective(recipe, tokenizer)
    if recipe.loss.name == "kto":
        return KTOObjective(recipe, tokenizer)
    return PreferenceObjective(recipe, tokenizer)
