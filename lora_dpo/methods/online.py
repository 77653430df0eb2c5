"""Online DPO: each step samples k completions per prompt from the current policy, scores them with a judge
(judges.py), and trains on each prompt's best against its worst completion, the reference computed on the spot.

The pairs are `EncodedPair`s tokenised exactly as offline pairs are, with one difference that matters: a sampled
completion keeps the token ids the policy generated (never decoded and re-encoded, which can change them), so
DPO trains on the very tokens the policy sampled. See `sample_completions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.stats import OnlineStats
from ..data.pairs import EncodedPair
from ..data.tokenize import Prompt, encode_prompt, reply_end, stop_ids, truncate_prompt
from ..model.layout import Layout
from ..model.sampling import sample_ids
from ..model.wrapped import policy_of
from .base import StepContext
from .judges import Judge, load_judge
from .preference import PreferenceMethod

# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class Sample:
    ids: list[int]  # the generated ids up to the end of the turn, then the rest of the template's turn end (as an offline reply ends); as generated when cut short
    text: str  # ids decoded without special tokens, stripped: what the judge reads
    finished: bool  # ended its turn (False: hit max_new_tokens, or cut to fit max_length)


def prompt_ids(tokenizer, prompt: Prompt, max_prompt_length: int | None = None) -> list[int]:
    """`encode_prompt`, cut from the left to `max_prompt_length` by the one truncation rule
    (data/tokenize.truncate_prompt), so an online pair's prompt is the one an offline pair of that prompt gets."""
    ids = encode_prompt(tokenizer, prompt)
    return ids if max_prompt_length is None else truncate_prompt(ids, max_prompt_length, tokenizer.bos_token_id)


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    k: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 32,
) -> list[list[Sample]]:
    """k samples per prompt from the model as it is (the policy: adapter on), `result[i][j]` for prompt i.

    Tokenisation contract: the prompt is `prompt_ids(tokenizer, prompt, max_prompt_length)`, the context
    training will use; a sample keeps the ids the model generated, up to and including the first id that ends its
    turn (data/tokenize.stop_ids), followed by whatever else the chat template writes at the end of a turn
    (ChatML's newline after `<|im_end|>`), so a finished sample ends exactly as an offline reply does. A sample
    that reaches `max_new_tokens` first is kept as it is: DPO then trains on a cut completion, as it does on an
    offline one cut to max_length. With
    `max_length`, each sample is cut to `max_length - len(prompt ids)` tokens before it is decoded, so the judge
    reads exactly the tokens that will be trained on.

    Pure sampling: temperature and top_p only (model/sampling.PURE_SAMPLING); temperature 0 decodes greedily.
    The one sampling loop draws them (model/sampling.sample_ids): the same seed and batch give the same
    samples, and the caller's RNG stream is untouched. Rows are the prompts repeated k times.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stop, end = stop_ids(tokenizer), reply_end(tokenizer)
    encoded = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    rows = [i for i in range(len(prompts)) for _ in range(k)]  # prompt i's k samples are adjacent
    budget = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(e)) for e in encoded]
    for i, b in enumerate(budget):
        if b < 1:
            raise ValueError(f"prompt {i}: {len(encoded[i])} tokens leave no room in max_length {max_length}")
    generated = sample_ids(model, [encoded[i] for i in rows], pad_id=tokenizer.pad_token_id, stop=stop,
                           max_new_tokens=[budget[i] for i in rows], temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size, pure=True)
    samples = []
    for ids in generated:
        finished = bool(ids) and ids[-1] in stop
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()  # what the judge reads: the reply alone
        samples.append(Sample(ids=ids + end[1:] if finished and ids[-1] == end[0] else ids, text=text,
                              finished=finished))
    return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------------------- pairing


def build_pairs(
    tokenizer,
    prompts: Sequence[Prompt],
    samples: Sequence[Sequence[Sample]],
    scores: Sequence[Sequence[float]],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[list[EncodedPair], dict]:
    """One pair per prompt: chosen = its best-scored sample, rejected = its worst (the first of equals).

    A prompt yields no pair when its best and worst scores are equal (`online/ties`) or its best and worst
    samples have the same token ids (`online/identical`). Prompt ids are `prompt_ids(tokenizer, prompt,
    max_prompt_length)` (None: max_length // 2, as offline pairs); completion ids are the sampled
    ids, cut from the right to `max_length - len(prompt ids)` (a no-op on samples drawn with that max_length).
    `indices[i]` becomes pair.index (default: i).

    Returns (pairs, stats) with stats `online/prompts`, `online/pairs`, `online/ties`, `online/identical`,
    `online/score` (mean score of every sample), `online/score_chosen` and `online/score_rejected` (means over
    the pairs, None without pairs), `online/distinct` (distinct samples of a prompt / k, averaged),
    `online/finished` (share of samples ending with EOS) and `online/length` (mean sample tokens).
    """
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if not len(prompts) == len(samples) == len(scores) == len(indices):
        raise ValueError("prompts, samples, scores and indices must have one entry per prompt")
    pairs: list[EncodedPair] = []
    ties = identical = 0
    chosen_scores, rejected_scores, all_scores = [], [], []
    distinct = n_samples = finished = tokens = 0
    for index, prompt, group, group_scores in zip(indices, prompts, samples, scores):
        if len(group) != len(group_scores) or not group:
            raise ValueError(f"prompt {index}: {len(group)} samples but {len(group_scores)} scores")
        all_scores.extend(group_scores)
        distinct += len({tuple(s.ids) for s in group})
        n_samples += len(group)
        finished += sum(s.finished for s in group)
        tokens += sum(len(s.ids) for s in group)
        best = max(range(len(group)), key=lambda j: group_scores[j])  # first of equals
        worst = min(range(len(group)), key=lambda j: group_scores[j])
        if group_scores[best] == group_scores[worst]:
            ties += 1
            continue
        p = prompt_ids(tokenizer, prompt, max_prompt)
        room = max_length - len(p)
        if room < 1:
            raise ValueError(f"prompt {index}: {len(p)} prompt tokens leave no room in max_length {max_length}")
        chosen, rejected = group[best].ids[:room], group[worst].ids[:room]
        if chosen == rejected:
            identical += 1
            continue
        pairs.append(EncodedPair(index=index, prompt=prompt, prompt_ids=p, chosen_ids=chosen, rejected_ids=rejected))
        chosen_scores.append(group_scores[best])
        rejected_scores.append(group_scores[worst])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    stats = {
        "online/prompts": len(prompts),
        "online/pairs": len(pairs),
        "online/ties": ties,
        "online/identical": identical,
        "online/score": mean(all_scores),
        "online/score_chosen": mean(chosen_scores),
        "online/score_rejected": mean(rejected_scores),
        "online/distinct": distinct / n_samples if n_samples else None,
        "online/finished": finished / n_samples if n_samples else None,
        "online/length": tokens / n_samples if n_samples else None,
    }
    return pairs, stats


def online_pairs(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: Judge,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_length: int,
    max_prompt_length: int | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 32,
) -> tuple[list[EncodedPair], dict]:
    """One optimizer step's pairs: k samples per prompt from the policy (`sample_completions`), scored by
    `judge`, best vs worst (`build_pairs`). Pass a seed that changes every step (e.g. recipe seed + step)
    so that a resumed run draws the same samples. Returns (pairs, stats); fewer pairs than prompts when
    some prompts tie (counted in stats)."""
    if k < 2:
        raise ValueError(f"online DPO needs k >= 2 samples per prompt, got {k}")
    if temperature <= 0:
        raise ValueError("online DPO needs temperature > 0: greedy decoding gives k identical samples")
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    if max_prompt >= max_length:
        raise ValueError(f"max_prompt_length {max_prompt} leaves no room for a completion in max_length {max_length}")
    # what fits is not cut (data/tokenize.fit): the prompt keeps as much as max_new_tokens leaves room for
    max_prompt = max(max_prompt, max_length - max_new_tokens)
    samples = sample_completions(
        model, tokenizer, prompts, k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, max_length=max_length, max_prompt_length=max_prompt, batch_size=batch_size,
    )  # fmt: skip
    scores = judge(prompts, [[s.text for s in group] for group in samples])
    return build_pairs(
        tokenizer, prompts, samples, scores, max_length=max_length, max_prompt_length=max_prompt, indices=indices
    )


class OnlineMethod(PreferenceMethod):
    """Online DPO: each step, the step's prompts (from data.train) are answered `online.samples` times by the
    current policy; the judge's best and worst answers make the step's pairs, and the reference is computed for
    them on the spot. Held-out evaluation uses the offline eval pairs (rewards relative to the reference)."""

    Stats = OnlineStats
    precomputes_reference = False

    def __init__(self, recipe, tokenizer, layout: Layout = Layout(False), judge: Judge | None = None):
        super().__init__(recipe, tokenizer, layout)
        self.judge = judge

    def prepare(self, device) -> None:
        if self.judge is None:
            self.judge = load_judge(self.recipe.online.judge, device)

    def loss(self, model, items, positions, reference, ctx: StepContext, stats: OnlineStats) -> torch.Tensor:
        o, d = self.recipe.online, self.recipe.data
        prompts = [item.prompt for item in items]
        pairs, info = online_pairs(
            policy_of(model), self.tokenizer, prompts, self.judge, k=o.samples, max_new_tokens=o.max_new_tokens,
            temperature=o.temperature, top_p=o.top_p, seed=self.recipe.train.seed * 1_000_003 + ctx.step * 4099 + positions[0],
            max_length=d.max_length, max_prompt_length=d.max_prompt_length, indices=positions,
        )  # fmt: skip
        model.train()
        n = len(prompts) * o.samples
        stats.add_sums(0, 0, {}, {"online/score": (info["online/score"] * n, n),
                                  "online/no_pair": (len(prompts) - len(pairs), len(prompts))})
        if pairs:
            return super().loss(model, pairs, positions, None, ctx, stats)
        # every prompt tied: a forward with zero loss keeps the processes' collective backward in step
        return 0.0 * super().loss(model, items[:1], positions[:1], None, ctx, self.Stats())

    def evaluate(self, model, items, reference, ctx: StepContext, stats) -> None:
        PreferenceMethod.loss(self, model, items, None, reference, ctx, stats)
