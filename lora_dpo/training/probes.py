"""What the model does when it speaks: sampled completions and the figures measured on them.

Log-prob metrics on the dataset say how the policy rates given replies; they cannot show a policy that has
collapsed onto a few phrasings, or how far its own samples have moved from the reference. So at evaluation
(and every `loss.kl_every` steps under adaptive beta) the trainer samples completions from the policy and measures:

- `behaviour`: the mean of the recipe's scorer (`eval.scorer`), when it has one;
- `diversity/distinct_1`, `diversity/distinct_2`: distinct token n-grams / all token n-grams over the samples
  (Li et al. 2016); a collapse shows as a fall against the reference's figure;
- `kl/sampled`: mean over sampled tokens of log pi(y_t) - log pi_ref(y_t), y ~ pi: an unbiased estimate of
  KL(pi || pi_ref) per token (the k1 estimator), unlike `kl`, which averages the log-ratio over the dataset's
  replies rather than the policy's own;
- `length`: mean completion tokens (length exploitation shows here first).

`AdaptiveBeta` raises beta so that `kl/sampled` levels off at `loss.target_kl` instead of growing past it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Recipe, load_scorer
from ..model.sampling import generate, score_completions


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over token sequences (0.0 when there are none)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sampled_kl(model, tokenizer, prompts: list, texts: list[str], batch_size: int = 16) -> float:
    """Mean per-token log pi(y) - log pi_ref(y) over the completions `texts` sampled from pi (re-tokenised as
    training tokenises them); `model` is the peft model with its policy adapter active."""
    policy, reference = score_completions(model, tokenizer, prompts, texts, batch_size)
    ratio = policy.sums - reference.sums
    # summed batch by batch into Python floats, as the numbers were first computed (the same rounding)
    num = sum(float(ratio[i : i + batch_size].sum()) for i in range(0, len(texts), batch_size))
    den = sum(float(policy.counts[i : i + batch_size].sum()) for i in range(0, len(texts), batch_size))
    return num / den if den else 0.0


def sample_metrics(model, tokenizer, prompts: list, *, adapter: bool, max_new_tokens: int, temperature: float,
                   seed: int, scorer=None, with_kl: bool = True, show: bool = True) -> dict:
    """Sample one completion per prompt from the policy (`adapter`) or the reference, and measure them (see
    the module docstring). The same seed gives the reference and the policy the same random stream."""
    who = "policy" if adapter else "reference model"
    texts = generate(model, tokenizer, prompts, adapter=adapter, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed, desc=f"sampling {len(prompts)} replies of the {who}" if show else None)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = {"diversity/distinct_1": distinct_n(ids, 1), "diversity/distinct_2": distinct_n(ids, 2),
           "length": sum(map(len, ids)) / max(len(ids), 1)}
    if scorer is not None:
        out["behaviour"] = sum(float(scorer(t)) for t in texts) / max(len(texts), 1)
    if adapter and with_kl:
        out["kl/sampled"] = sampled_kl(model, tokenizer, prompts, texts)
    return out


@dataclass(frozen=True)
class AdaptiveBeta:
    """Adaptive KL control for DPO: beta rises while the sampled KL is above its target and relaxes back while
    it is below, never under the recipe's beta (after the adaptive KL coefficient of Ziegler et al. 2019).

    Why a ceiling and not a two-sided controller: a larger beta saturates the DPO loss sooner (the sigmoid
    flattens once beta * h is large), so the policy stops pulling away from the reference; a smaller one does
    not make it move faster, because Adam normalises the gradient's scale. And before the policy has moved,
    the KL is 0 whatever beta is, so a controller free to lower beta would cut it before training begins and
    find it too low once the KL rises (measured on the toy world: the KL overshot the target 4x). Each
    measurement updates

        beta <- clamp(beta * exp(rate * clip(KL / target - 1, -0.5, 1)), floor, max_beta)

    so beta grows by up to e^rate per measurement while the KL is above target. The controller holds no beta
    of its own: the loop owns beta and asks for the next one."""

    target: float
    floor: float  # the recipe's beta
    rate: float = 1.0
    max_beta: float = 100.0

    def update(self, beta: float, measured_kl: float) -> float:
        """The beta after a measurement of the sampled KL."""
        err = max(-0.5, min(1.0, measured_kl / self.target - 1))
        return max(self.floor, min(self.max_beta, beta * math.exp(self.rate * err)))


class Sampler:
    """Samples from the policy (or the reference) on held-out prompts and measures them (probes.py): the
    behaviour score, diversity, sampled KL. Every process samples the same prompts from the same seed, so all
    of them get the same figures without communicating (and under FSDP their collective forwards stay in step)."""

    def __init__(self, recipe: Recipe, tokenizer, prompts: list, log=print, show: bool = True):
        e = recipe.eval
        self.recipe, self.tokenizer, self.log, self.show = recipe, tokenizer, log, show
        self.prompts = prompts[: e.num_prompts]
        self.scorer = load_scorer(e.scorer) if e.scorer else None
        self.reference_distinct: float | None = None

    def __call__(self, policy, adapter: bool) -> dict:
        if not self.prompts:
            return {}
        e = self.recipe.eval
        out = sample_metrics(policy, self.tokenizer, self.prompts, adapter=adapter, max_new_tokens=e.max_new_tokens,
                             temperature=e.temperature, seed=self.recipe.train.seed, scorer=self.scorer,
                             show=self.show)
        d2 = out["diversity/distinct_2"]
        if not adapter:
            self.reference_distinct = d2
        elif self.reference_distinct and d2 < e.min_diversity * self.reference_distinct:
            self.log(f"warning: the policy's samples are collapsing: distinct-2 {d2:.3f} against the reference's "
                f"{self.reference_distinct:.3f} (eval.min_diversity={e.min_diversity:g}); lower train.lr or raise "
                "loss.beta, or set loss.target_kl")
        return out


def measure_kl(recipe: Recipe, policy, tokenizer, prompts: list, step: int) -> float:
    """Sampled KL(pi || pi_ref) per token on `loss.kl_prompts` of the training `prompts`, a different window of
    them at each measurement, sampled from a seed of the step (the same on every process)."""
    n = min(recipe.loss.kl_prompts, len(prompts))
    start = (step // recipe.loss.kl_every * n) % len(prompts)
    chosen = [prompts[(start + i) % len(prompts)] for i in range(n)]
    texts = generate(policy, tokenizer, chosen, adapter=True, max_new_tokens=recipe.eval.max_new_tokens,
                     temperature=1.0, seed=recipe.train.seed + step)
    return sampled_kl(policy, tokenizer, chosen, texts)
