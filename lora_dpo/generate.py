"""Sample from the policy (adapter on) or the reference (adapter off) for the same prompts, and score a
response by its implicit DPO reward beta * (log pi_theta(y|x) - log pi_ref(y|x))."""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Sequence

import torch

from .data import Prompt, encode_completion, encode_prompt
from .errors import ConfigError, first_line
from .logps import sequence_logps
from .model import reference_model


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
) -> list[str]:
    """One sampled response per prompt, from the policy (`adapter=True`) or the reference (`adapter=False`:
    `model.reference_model`, the bare base or the model's frozen REFERENCE adapter).

    temperature 0 decodes greedily. Sampling draws from a forked RNG seeded with `seed`, so the training
    RNG stream is untouched and the same seed gives the same samples with the adapter on or off.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    adapter_ctx = contextlib.nullcontext() if adapter else reference_model(model)
    with eval_mode(model), adapter_ctx, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(e) for e in encoded)
            # left padding: every prompt ends at the same column, where generation starts
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            new = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **sampling,
            )[:, width:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [text.strip() for text in out]


@torch.no_grad()
def implicit_rewards(model, tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], beta: float) -> list[float]:
    """beta * (log pi_theta(y|x) - log pi_ref(y|x)) for each (prompt, response), summed over response tokens."""
    device = next(model.parameters()).device
    rows = [(encode_prompt(tokenizer, p), encode_completion(tokenizer, r)) for p, r in zip(prompts, responses)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        mask[i, len(p) : len(p) + len(c)] = True
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    with eval_mode(model):
        policy = sequence_logps(model, ids, attn, mask).sums
        with reference_model(model):
            reference = sequence_logps(model, ids, attn, mask).sums
    return (beta * (policy - reference)).tolist()


def import_callable(spec: str, key: str, expected: str = "'module:function'") -> Callable:
    """`module:function` -> the function. A bad spec, a failed import or something not callable is one
    ConfigError naming the recipe `key` (and, for a bad spec, what `expected` it to be)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: expected {expected}, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}: cannot import {spec!r}: {first_line(exc)}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn


def load_scorer(spec: str) -> Callable[[str], float]:
    """The recipe's `eval.scorer` (`module:function`, text -> float)."""
    return import_callable(spec, "eval.scorer")
