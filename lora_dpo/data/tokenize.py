"""Tokenisation shared by every kind of example: the prompt as the model sees it at inference, one completion
ended by exactly one EOS, and the one truncation rule for prompts.

Training, evaluation, sampling, online DPO and the merge check all encode through these functions, so they
cannot tokenise differently.
"""

from __future__ import annotations

from typing import Union

from ..errors import DataError

Message = dict
Prompt = Union[str, list[Message]]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it at inference: chat template with the generation prompt when the
    tokenizer has one (a plain-string prompt becomes one user message), else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    # no chat template: join the turns as plain text so the model still sees every turn
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\n\nassistant: "


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, in one call into the tokenizer. The template itself places BOS where the
    model wants it, so no special tokens are added on top; without a template, BOS is prepended when the
    tokenizer has one."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if not getattr(tokenizer, "chat_template", None) and bos is not None:
        ids = [x if x and x[0] == bos else [bos] + x for x in ids]
    return ids


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of replies, each ended by exactly one EOS (the end-of-turn token of chat models)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so a completion cannot be ended; set tokenizer.eos_token")
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        while ids and ids[-1] == eos:  # a reply that already ends in EOS keeps one, not two
            ids = ids[:-1]
        out.append(ids + [eos])
    return out


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of one rendered prompt (`encode_prompts`)."""
    return encode_prompts(tokenizer, [render_prompt(tokenizer, prompt)])[0]


def encode_completion(tokenizer, text: str) -> list[int]:
    """Token ids of one reply, then exactly one EOS (`encode_completions`)."""
    return encode_completions(tokenizer, [text])[0]


def truncate_prompt(ids: list[int], budget: int, bos: int | None) -> list[int]:
    """A prompt cut to `budget` tokens from the left: its end (the question and the generation prompt) is what
    the reply answers; a leading BOS, which models need, is kept."""
    if len(ids) <= budget:
        return ids
    head = [bos] if bos is not None and ids[0] == bos and budget > 1 else []
    return head + ids[len(ids) - (budget - len(head)) :]
