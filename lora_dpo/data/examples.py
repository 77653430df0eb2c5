"""Single-completion data, for SFT and KTO: one (prompt, completion) per example, with a good/bad label for KTO.

| format            | columns (extra columns are ignored)                                                 |
|-------------------|--------------------------------------------------------------------------------------|
| prompt_completion | prompt (text or messages), completion (text or one assistant message); label for KTO |
| messages          | messages: a conversation ending with the assistant's reply; label for KTO            |
| alpaca            | instruction, optional input, output                                                 |
| sharegpt          | conversations ({from, value} or {role, content}) ending with the assistant's reply   |
| preference pairs  | any format of formats.py: SFT trains on `chosen`; KTO takes chosen as desirable and   |
|                   | rejected as undesirable, two unpaired examples per row                              |

SFT keeps only desirable examples of labelled data (a thumbs-down reply is not one to imitate); KTO needs a label
on every example. Labels are booleans (or 0/1). Prompts and completions are tokenised exactly as preference data
(tokenize.py): the reply rendered through the chat template after the prompt, ending as the template ends an
assistant turn (one EOS without a template); truncation as data.truncation says.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import datasets

from ..config import DataConfig
from ..errors import DataError
from .encoded import encode_rows, ids, records, tokenizer_digest
from .formats import (
    RowError, detect_format, malformed_rows, normalise_row, parse_messages, parse_prompt, parse_reply, row_kwargs,
    row_system, with_system,
)
from .pairs import hold_out, new_report
from .report import DataReport
from .sources import eval_rows, train_rows
from .tokenize import Prompt, encode_conversations, fit

SINGLE_FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt_single")


@dataclass
class EncodedExample:
    index: int  # row index in the source split (a preference row gives two examples with the same index)
    prompt: Prompt
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS unless truncated
    desirable: bool  # the label (always True for SFT)


def detect_single_format(columns, first_row: dict) -> str:
    """One of SINGLE_FORMATS, or "pairs:<format>" for preference data; DataError naming the columns otherwise."""
    cols = set(columns)
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "conversations" in cols and "chosen" not in cols:
        return "sharegpt_single"
    try:
        return "pairs:" + detect_format(columns, first_row)
    except DataError:
        raise DataError(
            f"no known single-completion format fits the columns found: {', '.join(columns)}. Expected "
            "prompt/completion (+ label), messages (+ label), instruction/input/output (Alpaca), conversations "
            "(ShareGPT), or preference pairs (prompt/chosen/rejected and the other layouts of lora-dpo data)"
        ) from None


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RowError("label is missing" if value is None else f"label is {value!r}, expected true or false")


def _last_reply(messages: list[dict], field: str) -> tuple[list[dict], str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"{field} does not end with an assistant reply")
    if len(messages) < 2:
        raise RowError(f"{field} has a reply but no prompt")
    return messages[:-1], messages[-1]["content"]


def normalise_single(record: dict, fmt: str, labelled: bool, system_prompt: str | None) -> list[dict]:
    """[{"prompt", "completion", "desirable"}] from one row: one example, or two for a preference pair under
    KTO (`labelled`: the label decides; unlabelled SFT rows are desirable). Raises RowError."""
    if fmt.startswith("pairs:"):
        pair = normalise_row(record, fmt.split(":", 1)[1], system_prompt)
        out = [{"prompt": pair["prompt"], "completion": pair["chosen"], "desirable": True}]
        if labelled:
            out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "desirable": False})
        return out
    if fmt == "prompt_completion":
        prompt = parse_prompt(record.get("prompt"), "prompt")
        prefix = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = parse_reply(record.get("completion"), "completion", prefix)
    elif fmt == "messages":
        prompt, completion = _last_reply(parse_messages(record.get("messages"), "messages"), "messages")
    elif fmt == "sharegpt_single":
        prompt, completion = _last_reply(parse_messages(record.get("conversations"), "conversations", sharegpt=True),
                                         "conversations")
    elif fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise RowError("instruction and output must be text")
        prompt = instruction + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        completion = output
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
        raise RowError("prompt is empty")
    if not completion.strip():
        raise RowError("completion is empty")
    desirable = _label(record.get("label")) if labelled or "label" in record else True
    return [{"prompt": with_system(prompt, row_system(record, system_prompt)), "completion": completion,
             "desirable": desirable}]


EXAMPLE_COLUMNS = datasets.Features({
    "index": datasets.Value("int64"), "error": datasets.Value("string"), "prompt": datasets.Value("string"),
    "prompt_ids": ids(), "completion_ids": ids(), "desirable": datasets.Value("bool"),
})  # fmt: skip


def _encode_examples(batch: dict, indices: list[int], *, fmt: str, labelled: bool, system_prompt: str | None,
                     tokenizer) -> dict:
    """One batch of rows -> their examples (two of a preference row for KTO), each with its row's index and token
    ids before truncation; a malformed row -> one output row with the reason in `error`."""
    out = {name: [] for name in EXAMPLE_COLUMNS}
    valid = []  # (position in out, normalised example, template arguments)
    for i, record in zip(indices, records(batch)):
        try:
            examples, kw, error = normalise_single(record, fmt, labelled, system_prompt), row_kwargs(record), ""
        except RowError as exc:
            examples, error = [], exc.reason
        if not examples:
            for name, value in zip(EXAMPLE_COLUMNS, (i, error, "null", [], [], False)):
                out[name].append(value)
        for ex in examples:
            valid.append((len(out["index"]), ex, kw))
            for name, value in zip(EXAMPLE_COLUMNS, (i, "", json.dumps(ex["prompt"]), [], [], bool(ex["desirable"]))):
                out[name].append(value)
    encoded = encode_conversations(tokenizer, [ex["prompt"] for _, ex, _ in valid],
                                   [[ex["completion"]] for _, ex, _ in valid], [kw for _, _, kw in valid])
    for (k, _, _), enc in zip(valid, encoded):
        if isinstance(enc, Exception):
            out["error"][k] = f"the chat template rejected the prompt ({enc})"
        else:
            out["prompt_ids"][k], (out["completion_ids"][k],) = enc
    return out


def _encode(rows, label: str, cfg: DataConfig, tokenizer, report: DataReport, labelled: bool) -> list[EncodedExample]:
    if len(rows) == 0:
        raise DataError(f"{label}: no rows")
    try:
        fmt = detect_single_format(rows.column_names, rows[0])
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    if labelled and fmt in ("prompt_completion", "messages", "sharegpt_single", "alpaca") and "label" not in rows.column_names:
        raise DataError(f"{label}: KTO needs a good/bad `label` column (true/false) beside the {fmt} columns, "
                        f"or preference pairs (chosen is desirable, rejected undesirable); columns found: "
                        f"{', '.join(rows.column_names)}")
    report.rows_read += len(rows)
    report.formats[fmt] = report.formats.get(fmt, 0) + len(rows)
    encode = functools.partial(_encode_examples, fmt=fmt, labelled=labelled, system_prompt=cfg.system_prompt,
                               tokenizer=tokenizer)
    table = encode_rows(rows, encode, EXAMPLE_COLUMNS, label=label,
                        key=["examples", fmt, labelled, cfg.system_prompt, tokenizer_digest(tokenizer)]).to_dict()
    kept = list(zip(*(table[name] for name in EXAMPLE_COLUMNS)))
    bad = sorted({i: error for i, error, *_ in kept if error}.items())  # a row's examples share its error
    if bad and cfg.on_bad_rows == "error":
        raise malformed_rows(label, bad, "row(s)")
    for _, reason in bad:
        report.malformed[reason] = report.malformed.get(reason, 0) + 1
    kept = [k for k in kept if not k[1]]
    if not labelled:  # SFT imitates only the replies marked good
        dropped = sum(not desirable for *_, desirable in kept)
        if dropped:
            report.malformed["undesirable (label false): not imitated by SFT"] = dropped
        kept = [k for k in kept if k[5]]
    out = []
    for i, _, prompt, p, c, desirable in kept:
        if not p:
            report.malformed["prompt renders to no tokens"] = report.malformed.get("prompt renders to no tokens", 0) + 1
            continue
        fitted = fit(p, [c], cfg.max_length, cfg.prompt_budget, cfg.truncation, tokenizer.bos_token_id)
        if fitted is None:
            report.dropped_for_length += 1
            continue
        p, (c,), prompt_cut, cuts = fitted
        report.truncated_prompts += prompt_cut
        report.truncated_completions += cuts
        out.append(EncodedExample(i, json.loads(prompt), p, c, bool(desirable)))
    return out


def build_completion_datasets(cfg: DataConfig, tokenizer, seed: int, labelled: bool):
    """(train, eval, report) of single-completion examples; `labelled`: KTO (labels required, kept both ways).
    The eval split follows the rules of pairs.build_datasets: data.eval (a split or another source), else
    data.eval_fraction of train held out by a seeded shuffle."""
    report = new_report(cfg, unit="example")
    train = _encode(train_rows(cfg), cfg.train, cfg, tokenizer, report, labelled)
    if not train:
        raise DataError(f"{cfg.train}: no training examples left ({sum(report.malformed.values())} malformed or "
                        f"skipped, {report.dropped_for_length} too long for max_length={cfg.max_length})")
    evals: list[EncodedExample] = []
    if cfg.eval is not None:
        rows, label = eval_rows(cfg)
        report.eval_from = f"from {label}"
        evals = _encode(rows, label, cfg, tokenizer, report, labelled)
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        # hold out whole source rows, so a preference row's two KTO examples land on one side
        indices = sorted({ex.index for ex in train})
        held = {indices[k] for k in hold_out(len(indices), cfg.eval_fraction, seed)}
        evals = [ex for ex in train if ex.index in held]
        train = [ex for ex in train if ex.index not in held]
        report.eval_from = f"{cfg.eval_fraction:g} of train held out, seed {seed}"
    if labelled:
        report.labels = {"desirable": sum(ex.desirable for ex in train),
                         "undesirable": sum(not ex.desirable for ex in train)}
        missing = [k for k, v in report.labels.items() if v == 0]
        if missing:
            raise DataError(f"{cfg.train}: no {missing[0]} examples among the training data; KTO needs both labels")
    report.train_pairs, report.eval_pairs = len(train), len(evals)
    return train, evals, report


def mismatched(examples: list[EncodedExample], max_length: int) -> list[EncodedExample]:
    """KTO's KL examples: each prompt with the completion of the next example from another source row and of the
    same label, a completion the policy has no reason to prefer for that prompt, cut to fit max_length. Matching
    the label keeps the KL completions' mix of good and bad that of the batch whatever its order: preference
    pairs in file order (chosen, rejected, chosen, ...) would otherwise lend only chosen completions."""
    n, out = len(examples), []
    for k, e in enumerate(examples):
        following = [examples[(k + j) % n] for j in range(1, n)]
        other = next((o for o in following if o.index != e.index and o.desirable == e.desirable),
                     next((o for o in following if o.index != e.index), examples[(k + 1) % n]))
        out.append(EncodedExample(e.index, e.prompt, e.prompt_ids,
                                  other.completion_ids[: max(1, max_length - len(e.prompt_ids))], e.desirable))
    return out
