"""Sampling from the policy (adapter on) or the reference (adapter off), and scoring completions under both.

`sample_ids` is the one sampling loop (left-padded batches, a forked RNG), used by `generate` (texts, for the
probes and `lora-dpo compare`) and by online DPO (token ids, methods/online.py). `score_completions` runs the
policy and the reference over the same completions, for implicit rewards and the sampled KL.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..core.logps import SequenceLogps, completion_logps
from ..core.losses import implicit_rewards as reward_of
from ..data.batches import collate_completions, forward_inputs, to_device
from ..data.examples import EncodedExample
from ..data.tokenize import Prompt, encode_prompt, encode_reply, stop_ids
from ..progress import progress
from .adapters import reference_model

# transformers fills unset flags from the model's generation_config, then from global defaults (top_k=50); these
# switch them off, so that only temperature and top_p shape the distribution (the policy's own, for online DPO)
PURE_SAMPLING = dict(top_k=0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


@contextlib.contextmanager
def eval_mode(model):
    """Inside this block the model is in eval mode (no dropout: sample the policy itself; and generate() in
    train mode with gradient checkpointing gives wrong samples: transformers 5.23 switches the KV cache off
    mid-call); its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_ids(model, prompts: Sequence[list[int]], *, pad_id: int, stop: Sequence[int], max_new_tokens: Sequence[int],
               temperature: float, top_p: float, seed: int, batch_size: int, pure: bool = False,
               desc: str | None = None, **stream) -> list[list[int]]:
    """One sample per row of prompt ids from the model as it is, each up to and including its first id of `stop`
    (the end of its turn: data/tokenize.stop_ids) and at most its own `max_new_tokens[i]` tokens (no stop id when
    cut short).

    Rows go to `model.generate` `batch_size` at a time, left-padded so that every prompt ends at the column
    where generation starts. A forked RNG seeded with `seed` draws the samples: the same seed and batches give
    the same samples, and the caller's RNG stream is untouched. temperature 0 decodes greedily; `pure` switches
    off the model's own top_k, repetition penalty and the like (PURE_SAMPLING). The model is in eval mode
    inside (its mode is restored). `desc`: show a progress bar over the batches with this title (None: quiet).
    `stream`: transformers' `streamer` and `stopping_criteria`, handed to generate (a chat shows its one row as it
    grows, and can be cancelled)."""
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    if pure and temperature > 0:
        sampling.update(PURE_SAMPLING)
    out: list[list[int]] = []
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in starts if desc is None else progress(starts, desc=desc, unit="batch"):
            chunk = prompts[start : start + batch_size]
            budgets = max_new_tokens[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            new = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max(budgets), pad_token_id=pad_id,
                                 eos_token_id=list(stop), use_cache=True, **sampling, **stream)[:, width:].tolist()
            for row, budget in zip(new, budgets):
                # generate pads a row only after its stop id, so a row without one is all generated tokens
                cut = next((k + 1 for k, token in enumerate(row) if token in stop), len(row))
                out.append(row[: min(cut, budget)])
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    adapter: bool = True,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """One sampled response per prompt, from the policy (`adapter=True`) or the reference (`adapter=False`:
    `reference_model`, the bare base or the model's frozen REFERENCE adapter), decoded without special tokens.

    temperature 0 decodes greedily. The same seed gives the same samples with the adapter on or off. `desc`: a
    progress bar's title (None: quiet)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    with contextlib.nullcontext() if adapter else reference_model(model):
        rows = sample_ids(model, encoded, pad_id=tokenizer.pad_token_id, stop=stop_ids(tokenizer),
                          max_new_tokens=[max_new_tokens] * len(encoded), temperature=temperature, top_p=top_p,
                          seed=seed, batch_size=batch_size, desc=desc)
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


@torch.no_grad()
def score_completions(model, tokenizer, prompts: Sequence[Prompt], completions: Sequence[str],
                      batch_size: int = 16) -> tuple[SequenceLogps, SequenceLogps]:
    """Summed log-probs of each completion (encoded as training encodes it) after its prompt, under the policy
    and under the reference: (policy, reference), [N] each. In eval mode, without gradients."""
    device = next(model.parameters()).device
    examples = [EncodedExample(i, p, *encode_reply(tokenizer, p, c), True) for i, (p, c) in enumerate(zip(prompts, completions))]
    policy, reference = [], []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = forward_inputs(to_device(collate_completions(chunk, tokenizer.pad_token_id), device))
            policy.append(completion_logps(model, batch, len(chunk)))
            with reference_model(model):
                reference.append(completion_logps(model, batch, len(chunk)))
    join = lambda parts: SequenceLogps(torch.cat([p.sums for p in parts]), torch.cat([p.counts for p in parts]))  # noqa: E731
    return join(policy), join(reference)


def implicit_rewards(model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], beta: float) -> list[float]:
    """beta * (log pi_theta(y|x) - log pi_ref(y|x)) for each (prompt, response), summed over response tokens."""
    policy, reference = score_completions(model, tokenizer, prompts, responses, batch_size=max(1, len(prompts)))
    return reward_of(policy.sums, reference.sums, beta).tolist()
