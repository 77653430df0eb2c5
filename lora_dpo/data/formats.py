"""Preference data formats: recognise one from its columns, and normalise a row of it.

A normalised row is `{"prompt": str | list[message], "chosen": str, "rejected": str}`: the prompt as text or
as `{"role", "content"}` messages, chosen and rejected as the text of one assistant reply each. A `system` column, in any format, is the row's system
prompt (before data.system_prompt); a dataset's own column names are mapped onto these by data.columns (sources.py).

| format         | columns (extra columns are ignored)                                                  |
|----------------|---------------------------------------------------------------------------------------|
| standard       | prompt, chosen, rejected: strings                                                    |
| conversational | prompt (messages or string), chosen, rejected (messages; a repeated prompt is cut off) |
| implicit       | chosen, rejected: whole conversations; the prompt is their shared prefix               |
| hh             | chosen, rejected: Anthropic HH transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."       |
| sharegpt       | conversations ({from, value} or {role, content}), chosen, rejected; optional system   |
"""

from __future__ import annotations

import re

from ..errors import DataError
from .tokenize import template_kwargs

FORMATS = ("standard", "conversational", "implicit", "hh", "sharegpt")

EXPECTED_COLUMNS = (
    "prompt/chosen/rejected (standard: strings; conversational: lists of messages), "
    "chosen/rejected alone (whole conversations with a shared prompt, or Anthropic HH transcripts), "
    "conversations/chosen/rejected (ShareGPT)"
)

# The roles a message may have, in every format: what chat templates know (tool: a tool's result). Anything else is
# refused with its row, never trained on as it stands.
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat-template roles (LLaMA-Factory writes a tool's result as `observation`)
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", **{r: r for r in ROLES}}

# a turn marker at the start of the text or after a blank line, as in Anthropic/hh-rlhf
_HH_TURN = re.compile(r"(?:\A|\n\n)[ \t]*(Human|Assistant):")


SHOWN_BAD_ROWS = 5  # malformed rows quoted in an error message; the rest are counted


class RowError(ValueError):
    """One row cannot be used; `reason` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def malformed_rows(label: str, bad: list[tuple[int, str]], noun: str) -> DataError:
    """The one error for malformed rows (data.on_bad_rows=error): the first SHOWN_BAD_ROWS by index and reason,
    the rest counted. `bad`: (row index, reason), sorted; `noun`: "row", "rows" or "row(s)"."""
    shown = "; ".join(f"row {i}: {reason}" for i, reason in bad[:SHOWN_BAD_ROWS])
    more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return DataError(f"{label}: {len(bad)} malformed {noun}: {shown}{more} (set data.on_bad_rows=skip to skip them)")


def row_kwargs(record: dict) -> dict:
    """The row's chat-template arguments: its `tools` and `chat_template_kwargs` columns, when it has them."""
    try:
        return template_kwargs(record.get("tools"), record.get("chat_template_kwargs"))
    except ValueError as exc:  # json.JSONDecodeError
        raise RowError(f"tools / chat_template_kwargs: not valid JSON ({exc})") from None


def detect_format(columns, first_row: dict) -> str:
    """The format of a dataset with these columns, whose first row is `first_row`.

    Returns one of "standard", "conversational", "implicit", "hh", "sharegpt". Raises DataError for unpaired
    (KTO) feedback and for columns that fit no format; both messages name the columns found.
    """
    cols = set(columns)
    found = ", ".join(columns)
    if {"chosen", "rejected"} <= cols:
        if "conversations" in cols:
            return "sharegpt"
        if "prompt" in cols:
            # one list anywhere in the triple means messages; a per-row mix is handled by normalise_row
            values = (first_row.get("prompt"), first_row.get("chosen"), first_row.get("rejected"))
            return "conversational" if any(isinstance(v, (list, dict)) for v in values) else "standard"
        sample = next((first_row.get(k) for k in ("chosen", "rejected") if first_row.get(k) is not None), None)
        if isinstance(sample, list):
            return "implicit"
        if isinstance(sample, str):
            if _HH_TURN.search(sample):
                return "hh"
            raise DataError(
                f"columns found: {found}; chosen and rejected are plain text but there is no prompt column "
                f"and they are not Anthropic HH transcripts ('\\n\\nHuman: ... \\n\\nAssistant: ...'). "
                f"Expected columns: {EXPECTED_COLUMNS}"
            )
    if "label" in cols and ({"prompt", "completion"} <= cols or "messages" in cols):
        raise DataError(
            f"columns found: {found}. This is unpaired (KTO) feedback: one completion per row with a good/bad "
            f"label. DPO needs a chosen and a rejected reply to the same prompt (expected columns: "
            f"{EXPECTED_COLUMNS}); KTO trains on unpaired labels: set loss.name=kto (see recipes/toy-kto.yaml)"
        )
    raise DataError(f"no known preference format fits the columns found: {found}. Expected columns: {EXPECTED_COLUMNS}")


def normalise_row(row: dict, fmt: str, system_prompt: str | None = None) -> dict:
    """`{"prompt", "chosen", "rejected"}` from one row of format `fmt` (see `detect_format`).

    chosen and rejected become the text of one assistant reply each. `system_prompt` is prepended as a
    system message to a prompt that has none (a string prompt becomes [system, user]). Raises RowError.
    """
    if fmt in ("standard", "conversational"):
        prompt = parse_prompt(row.get("prompt"), "prompt")
        prefix = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen = parse_reply(row.get("chosen"), "chosen", prefix)
        rejected = parse_reply(row.get("rejected"), "rejected", prefix)
    elif fmt == "sharegpt":
        prompt = parse_messages(row.get("conversations"), "conversations", sharegpt=True)
        system = row.get("system")  # LLaMA-Factory keeps the system prompt in its own column
        if isinstance(system, str) and system.strip() and not _has_system(prompt):
            prompt = [{"role": "system", "content": system}] + prompt
        chosen = parse_reply(row.get("chosen"), "chosen", prompt, sharegpt=True)
        rejected = parse_reply(row.get("rejected"), "rejected", prompt, sharegpt=True)
    elif fmt in ("implicit", "hh"):
        prompt, chosen, rejected = _split_shared_prefix(row.get("chosen"), row.get("rejected"))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")

    if isinstance(prompt, str) and not prompt.strip():
        raise RowError("prompt is empty")
    if isinstance(prompt, list) and not any(m["role"] != "system" for m in prompt):
        raise RowError("prompt is empty" if not prompt else "prompt has only a system message")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError(f"{name} is empty")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    return {"prompt": with_system(prompt, row_system(row, system_prompt)), "chosen": chosen, "rejected": rejected}


def row_system(row: dict, system_prompt: str | None) -> str | None:
    """The system prompt of a row: its own `system` column (LLaMA-Factory's and Intel/orca's layouts) when that
    has text, else data.system_prompt."""
    system = row.get("system")
    return system if isinstance(system, str) and system.strip() else system_prompt


def with_system(prompt, system: str | None):
    """`prompt` with `system` as its system message, unless it has one (a string prompt becomes [system, user])."""
    if not system or (isinstance(prompt, list) and _has_system(prompt)):
        return prompt
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return [{"role": "system", "content": system}] + user


def _has_system(messages: list[dict]) -> bool:
    return any(m["role"] == "system" for m in messages)


def _type(value) -> str:
    return {str: "text", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _message(value, where: str, sharegpt: bool = False) -> dict:
    """One message as {role, content}. ShareGPT rows may use from/value or role/content; Arrow fills the keys
    a message lacks with None, so the first non-None pair wins."""
    if not isinstance(value, dict):
        raise RowError(f"{where} is {_type(value)}, expected a {{role, content}} message")
    role = value.get("role") if value.get("role") is not None else value.get("from")
    content = value.get("content") if value.get("content") is not None else value.get("value")
    if not isinstance(role, str):
        raise RowError(f"{where} has no role (expected a 'role' or 'from' key)")
    if sharegpt or value.get("role") is None:  # from/value speakers are named human/gpt
        if role not in _SHAREGPT_ROLES:
            raise RowError(f"{where} has an unsupported role '{role}' (expected {', '.join(_SHAREGPT_ROLES)})")
        role = _SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise RowError(f"{where} has an unsupported role '{role}' (expected {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RowError(f"{where} has no text content")
    return {"role": role, "content": content}


def parse_messages(value, field: str, sharegpt: bool = False) -> list[dict]:
    if value is None:
        raise RowError(f"{field} is missing")
    if not isinstance(value, list):
        raise RowError(f"{field} is {_type(value)}, expected a list of messages")
    return [_message(m, f"{field} message {i + 1}", sharegpt) for i, m in enumerate(value)]


def parse_prompt(value, field: str):
    if value is None:
        raise RowError(f"{field} is missing")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a lone message
        return [_message(value, field)]
    if isinstance(value, list):
        return parse_messages(value, field)
    raise RowError(f"{field} is {_type(value)}, expected text or a list of messages")


def parse_reply(value, field: str, prompt: list[dict], sharegpt: bool = False) -> str:
    """The text of one assistant reply, from text, one message, or a list of messages that may repeat the
    prompt's messages first (UltraFeedback-binarized style)."""
    if value is None:
        raise RowError(f"{field} is missing")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        messages = [_message(value, field, sharegpt)]
    elif isinstance(value, list):
        messages = parse_messages(value, field, sharegpt)
        if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
            messages = messages[len(prompt) :]
    else:
        raise RowError(f"{field} is {_type(value)}, expected text or an assistant message")
    return _one_assistant(messages, field)


def _one_assistant(messages: list[dict], field: str) -> str:
    if len(messages) != 1:
        raise RowError(f"{field} has {len(messages)} messages after the prompt, expected one assistant reply")
    if messages[0]["role"] != "assistant":
        raise RowError(f"{field} is a '{messages[0]['role']}' message, expected an assistant reply")
    return messages[0]["content"]


def _parse_hh(text: str, field: str) -> list[dict]:
    """Anthropic HH transcript -> messages. Turn texts are stripped: the spaces around markers are format."""
    turns = list(_HH_TURN.finditer(text))
    if not turns or text[: turns[0].start()].strip():
        raise RowError(f"{field} is not an Anthropic HH transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    ends = [t.start() for t in turns[1:]] + [len(text)]
    return [
        {"role": "user" if t.group(1) == "Human" else "assistant", "content": text[t.end() : end].strip()}
        for t, end in zip(turns, ends)
    ]


def _split_shared_prefix(chosen, rejected) -> tuple[list[dict], str, str]:
    """Implicit prompt: chosen and rejected are whole conversations (messages, or HH transcripts) that share
    everything but the final assistant reply; the shared part is the prompt."""
    convs = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RowError(f"{field} is missing")
        if isinstance(value, str):
            convs.append(_parse_hh(value, field))
        elif isinstance(value, list):
            convs.append(parse_messages(value, field))
        else:
            raise RowError(f"{field} is {_type(value)}, expected a conversation")
    c, r = convs
    for field, conv in (("chosen", c), ("rejected", r)):
        if not conv or conv[-1]["role"] != "assistant":
            raise RowError(f"{field} does not end with an assistant reply")
    if c == r:
        raise RowError("chosen and rejected are identical")
    if c[:-1] != r[:-1]:
        # a shared prefix that stops before the last turn means the prompts differ: not a preference pair
        raise RowError("chosen and rejected have different prompts (they differ before their final reply)")
    return c[:-1], c[-1]["content"], r[-1]["content"]
