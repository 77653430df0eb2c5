"""Tokenisation shared by every kind of example: the prompt as the model sees it at inference, and each reply as the
chat template writes it after that prompt, end-of-turn included.

With a chat template (TRL 1.16's rule, so the tokens equal TRL's): the prompt is rendered with the generation
prompt, the prompt followed by the reply as one assistant message is rendered whole, and the reply's tokens are
what follows their common prefix. The reply therefore ends with whatever the template writes after an assistant
turn: ChatML's `<|im_end|>` and newline, Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, even where that is not
the tokenizer's EOS (a base model with a chat template). A template that renders the prompt differently alone
than followed by a reply (a generation prompt the full render drops) makes the prefix shorter; the reply then
starts where they part, as in TRL, with a warning once.

Without a chat template (a base model): the prompt is the plain text (BOS first when the tokenizer has one) and
the reply its own text followed by exactly one EOS.

Training, evaluation, sampling, online DPO, compare and the merge check all encode through these functions, so they
cannot tokenise differently.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence, Union

from jinja2.exceptions import TemplateError  # jinja2 renders chat templates; torch depends on it

from ..errors import DataError

Message = dict
Prompt = Union[str, list[Message]]

_warned: set[str] = set()


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def template_kwargs(tools: Any = None, extra: Any = None) -> dict:
    """Keyword arguments for `apply_chat_template` from a row's optional `tools` (a list of JSON schemas, or that
    list as a JSON string) and `chat_template_kwargs` (a mapping, or JSON)."""
    tools = json.loads(tools) if isinstance(tools, str) and tools.strip() else tools
    extra = json.loads(extra) if isinstance(extra, str) and extra.strip() else extra
    out = dict(extra or {})
    if tools:  # an empty list would make some templates (Llama 3.1) write their tool preamble
        out["tools"] = tools
    return out


def render_prompt(tokenizer, prompt: Prompt, **kwargs) -> str:
    """The prompt as the model sees it at inference: chat template with the generation prompt when the
    tokenizer has one (a plain-string prompt becomes one user message), else the plain text. `kwargs`: the
    row's template arguments (`template_kwargs`)."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True, **kwargs)
    if isinstance(prompt, str):
        return prompt
    # no chat template: join the turns as plain text so the model still sees every turn
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\n\nassistant: "


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: a text longer than the model's window is no news here (max_length cuts it later)
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, in one call into the tokenizer. The template itself places BOS where the
    model wants it, so no special tokens are added on top; without a template, BOS is prepended when the
    tokenizer has one."""
    ids = _ids(tokenizer, texts)
    bos = tokenizer.bos_token_id
    if not has_template(tokenizer) and bos is not None:
        ids = [x if x and x[0] == bos else [bos] + x for x in ids]
    return ids


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of replies as a base model without a template gets them: each followed by exactly one EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so a completion cannot be ended; set tokenizer.eos_token")
    out = []
    for ids in _ids(tokenizer, texts):
        while ids and ids[-1] == eos:  # a reply that already ends in EOS keeps one, not two
            ids = ids[:-1]
        out.append(ids + [eos])
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_conversations(tokenizer, prompts: Sequence[Prompt], replies: Sequence[Sequence[str]],
                         kwargs: Sequence[dict] | None = None) -> list:
    """For each row: (prompt ids, the ids of each of its replies), tokenised in one call into the tokenizer; or,
    for a conversation the chat template refuses, the exception it raised (jinja2's TemplateError: the caller
    names the row).

    With a chat template, a row's replies share one prompt: the shortest common prefix of the rendered prompt and
    each rendered prompt+reply (see the module's docstring). `kwargs[i]`: row i's template arguments."""
    kwargs = kwargs or [{}] * len(prompts)
    if not has_template(tokenizer):
        texts = [render_prompt(tokenizer, p) for p in prompts]
        flat = encode_completions(tokenizer, [r for rs in replies for r in rs])
        out, k = [], 0
        for p, rs in zip(encode_prompts(tokenizer, texts), replies):
            out.append((p, flat[k : k + len(rs)]))
            k += len(rs)
        return out
    rendered: list = []  # per row: [prompt, prompt+reply, ...] texts, or the template's exception
    for prompt, rs, kw in zip(prompts, replies, kwargs):
        messages = as_messages(prompt)
        try:
            rendered.append([tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)]
                            + [tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": r}],
                                                             tokenize=False, **kw) for r in rs])
        except TemplateError as exc:
            rendered.append(exc)
    ids = iter(_ids(tokenizer, [t for texts in rendered if isinstance(texts, list) for t in texts]))
    out = []
    for texts in rendered:
        if not isinstance(texts, list):
            out.append(texts)
            continue
        prompt, fulls = next(ids), [next(ids) for _ in texts[1:]]
        cut = min((common_prefix(prompt, full) for full in fulls), default=len(prompt))
        if cut < len(prompt) and "prefix" not in _warned:
            _warned.add("prefix")
            print(f"warning: the chat template renders a prompt differently alone than followed by its reply; the "
                  f"reply starts where they part, and the prompt's last {len(prompt) - cut} token(s) "
                  f"{tokenizer.decode(prompt[cut:])!r} are left out of training (as TRL does)", file=sys.stderr)
        out.append((prompt[:cut], [full[cut:] for full in fulls]))
    return out


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of one rendered prompt, with the generation prompt: what the model continues when it answers."""
    return encode_prompts(tokenizer, [render_prompt(tokenizer, prompt)])[0]


def encode_reply(tokenizer, prompt: Prompt, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of one prompt and reply, as training encodes them (`encode_conversations`)."""
    row = encode_conversations(tokenizer, [prompt], [[reply]])[0]
    if isinstance(row, Exception):
        raise row
    prompt_ids, (reply_ids,) = row
    return prompt_ids, reply_ids


def encode_completion(tokenizer, text: str) -> list[int]:
    """Token ids of one reply followed by exactly one EOS (`encode_completions`): the reply of a tokenizer
    without a chat template, and of one whose template ends a turn with EOS and nothing after it (the toy's)."""
    return encode_completions(tokenizer, [text])[0]


def reply_end(tokenizer) -> list[int]:
    """The tokens the chat template writes after a reply's text (`<|im_end|>` and a newline for ChatML): the common
    end of two different replies. [EOS] without a template."""
    if not has_template(tokenizer):
        return [tokenizer.eos_token_id]
    _, yes = encode_reply(tokenizer, "x", "yes")
    _, no = encode_reply(tokenizer, "x", "no")
    n = 0
    while n < min(len(yes), len(no)) and yes[-1 - n] == no[-1 - n]:
        n += 1
    return yes[len(yes) - n :] or [tokenizer.eos_token_id]


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a sampled reply: the first special token the template writes after a reply (its end of
    turn) and the tokenizer's EOS."""
    special = set(tokenizer.all_special_ids)
    turn = next((i for i in reply_end(tokenizer) if i in special), tokenizer.eos_token_id)
    return list(dict.fromkeys([turn, tokenizer.eos_token_id]))


def truncate_prompt(ids: list[int], budget: int, bos: int | None) -> list[int]:
    """A prompt cut to `budget` tokens from the left: its end (the question and the generation prompt) is what
    the reply answers; a leading BOS, which models need, is kept."""
    if len(ids) <= budget:
        return ids
    head = [bos] if bos is not None and ids[0] == bos and budget > 1 else []
    return head + ids[len(ids) - (budget - len(head)) :]


def fit(prompt: list[int], replies: list[list[int]], max_length: int, max_prompt: int, mode: str,
        bos: int | None) -> tuple[list[int], list[list[int]], bool, int] | None:
    """A prompt and its replies cut to fit `max_length` tokens (prompt + the longest reply), or None when they
    cannot (then the example is dropped). Returns (prompt, replies, prompt was cut, replies cut).

    What fits is never cut. Otherwise, `mode`:
    - keep_end (the default): the prompt keeps its end (the question the reply answers; a leading BOS too),
      losing only what the longest reply needs, but keeping at least `max_prompt` tokens; then the replies keep
      their start, cut to the room left.
    - keep_start (TRL's default): the sequence keeps its first max_length tokens: the prompt whole, the replies
      cut to the room left; an example whose prompt alone fills max_length is dropped.
    """
    longest = max(len(r) for r in replies)
    if len(prompt) + longest <= max_length:
        return prompt, replies, False, 0
    if mode == "keep_end":
        keep = max(min(len(prompt), max_prompt), max_length - longest)
        cut = truncate_prompt(prompt, keep, bos)
    else:
        cut = prompt
    room = max_length - len(cut)
    if room < 1:
        return None
    return cut, [r[:room] for r in replies], len(cut) < len(prompt), sum(len(r) > room for r in replies)
