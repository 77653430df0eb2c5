"""Preference pairs: rows of any recognised format (formats.py) normalised, tokenised, truncated and split into
training and held-out pairs, with the data report of what happened to them.

One normalised row is `{"prompt": str | list[message], "chosen": str, "rejected": str}` where a message is
`{"role": ..., "content": ...}` and chosen/rejected are the text of one assistant reply.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

import datasets

from ..config import DataConfig
from ..errors import DataError
from .formats import RowError, detect_format, malformed_rows, normalise_row, row_kwargs
from .encoded import encode_rows, ids, records, tokenizer_digest
from .report import DataReport, Measured, profile, row_key
from .sources import eval_rows, train_rows
from .tokenize import Prompt, encode_conversations, fit


@dataclass
class EncodedPair:
    index: int  # row index in the source dataset split (0-based), for messages and caching
    prompt: Prompt  # normalised prompt (system prompt applied), kept for generation
    prompt_ids: list[int]  # rendered prompt, generation prompt included; cut from the left if too long
    chosen_ids: list[int]  # completion tokens, ends with EOS unless truncated
    rejected_ids: list[int]


def new_report(cfg: DataConfig, unit: str = "pair") -> DataReport:
    """An empty report of `cfg`'s training data, counting `unit`s (pairs, or single-completion examples)."""
    return DataReport(
        source=cfg.train, rows_read=0, formats={}, malformed={}, dropped_for_length=0, truncated_prompts=0,
        truncated_completions=0, train_pairs=0, eval_pairs=0, max_length=cfg.max_length,
        max_prompt_length=cfg.prompt_budget, unit=unit,
    )  # fmt: skip


def truncate_pair(p: list[int], c: list[int], r: list[int], cfg: DataConfig, bos):
    """(prompt, chosen, rejected, prompt_cut, completions_cut) fitted to data.max_length by data.truncation
    (tokenize.fit), or None when the pair cannot fit or its difference was cut off."""
    fitted = fit(p, [c, r], cfg.max_length, cfg.prompt_budget, cfg.truncation, bos)
    if fitted is None:
        return None
    p, (c, r), prompt_cut, cuts = fitted
    if c == r:  # the difference was cut off: the pair no longer says which reply is better
        return None
    return p, c, r, prompt_cut, cuts


PAIR_COLUMNS = datasets.Features({
    "index": datasets.Value("int64"), "error": datasets.Value("string"), "prompt": datasets.Value("string"),
    "key": datasets.Value("binary"), "prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids(),
})  # fmt: skip


def _encode_pairs(batch: dict, indices: list[int], *, fmt: str, system_prompt: str | None, tokenizer) -> dict:
    """One batch of rows -> one output row each: its index, why it is malformed ("" if it is not), the normalised
    prompt (JSON), the row's identity for duplicate counting, and its token ids before truncation."""
    out = {name: [] for name in PAIR_COLUMNS}
    valid = []  # (position in out, normalised row, template arguments)
    for i, record in zip(indices, records(batch)):
        error, row = "", None
        try:
            row = normalise_row(record, fmt, system_prompt)
            valid.append((len(out["index"]), row, row_kwargs(record)))
        except RowError as exc:
            error = exc.reason
        out["index"].append(i), out["error"].append(error)
        out["prompt"].append(json.dumps(row["prompt"]) if row else "null")
        out["key"].append(row_key(row) if row else b"")
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        out[name] = [[] for _ in out["index"]]
    encoded = encode_conversations(tokenizer, [row["prompt"] for _, row, _ in valid],
                                   [[row["chosen"], row["rejected"]] for _, row, _ in valid],
                                   [kw for _, _, kw in valid])
    for (k, _, _), enc in zip(valid, encoded):
        if isinstance(enc, Exception):  # templates raise on conversations they refuse, e.g. roles out of order
            out["error"][k] = f"the chat template rejected the prompt ({enc})"
            continue
        p, (c, r) = enc
        out["prompt_ids"][k], out["chosen_ids"][k], out["rejected_ids"][k] = p, c, r
        if not p:
            out["error"][k] = "prompt renders to no tokens"
    return out


def _encode_source(
    rows, label: str, cfg: DataConfig, tokenizer, report: DataReport
) -> tuple[list[EncodedPair], list]:
    """Normalise, validate, tokenise (encoded.py: once per rows, tokenizer and code) and truncate every row of one
    split; update `report`'s counts. Returns the kept pairs and every valid row measured before truncation
    (dropped pairs included)."""
    if len(rows) == 0:
        raise DataError(f"{label}: no rows")
    try:
        fmt = detect_format(rows.column_names, rows[0])
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    report.rows_read += len(rows)
    report.formats[fmt] = report.formats.get(fmt, 0) + len(rows)
    encode = functools.partial(_encode_pairs, fmt=fmt, system_prompt=cfg.system_prompt, tokenizer=tokenizer)
    table = encode_rows(rows, encode, PAIR_COLUMNS, label=label,
                        key=["pairs", fmt, cfg.system_prompt, tokenizer_digest(tokenizer)]).to_dict()

    bad = [(i, error) for i, error in zip(table["index"], table["error"]) if error]
    if bad and cfg.on_bad_rows == "error":
        raise malformed_rows(label, bad, "row" if len(bad) == 1 else "rows")
    for _, reason in bad:
        report.malformed[reason] = report.malformed.get(reason, 0) + 1

    pairs, measured = [], []
    columns = (table[name] for name in ("index", "error", "prompt", "key", "prompt_ids", "chosen_ids", "rejected_ids"))
    for i, error, prompt, key, p, c, r in zip(*columns):
        if error:
            continue
        measured.append(Measured(i, key, len(p), len(c), len(r)))
        cut = truncate_pair(p, c, r, cfg, tokenizer.bos_token_id)
        if cut is None:
            report.dropped_for_length += 1
            continue
        p, c, r, prompt_cut, completions_cut = cut
        report.truncated_prompts += prompt_cut
        report.truncated_completions += completions_cut
        report.truncated_pairs += bool(prompt_cut or completions_cut)
        pairs.append(EncodedPair(index=i, prompt=json.loads(prompt), prompt_ids=p, chosen_ids=c, rejected_ids=r))
    return pairs, measured


def hold_out(n: int, fraction: float, seed: int) -> set[int]:
    """Which of n items (or source rows) a seeded shuffle holds out for evaluation: round(fraction x n) of them,
    at least 1 and at most n - 1 (data.eval_fraction without data.eval)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: min(n - 1, max(1, round(fraction * n)))])


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[EncodedPair], list[EncodedPair], DataReport]:
    """Training pairs, eval pairs and a report, from `cfg` (see `DataConfig`).

    `cfg.eval` is a split name of `cfg.train`, or another dataset (a file or Hub id, read from its `test`
    split when it has one, else `train`); when None, `cfg.eval_fraction` of the kept training pairs is held
    out by a shuffle seeded with `seed`. Raises DataError for anything the user must fix.
    """
    report = new_report(cfg)
    train, measured = _encode_source(train_rows(cfg), cfg.train, cfg, tokenizer, report)
    profile(report, measured)
    if not train:
        bad = sum(report.malformed.values())
        hint = ""
        if report.dropped_for_length:
            seq = report.lengths["sequence"]
            hint = (
                f" (prompt+completion is {seq['p50']} tokens at the median, {seq['p99']} at p99: raise "
                f"data.max_length or data.max_prompt_length)"
            )
        raise DataError(
            f"{cfg.train}: no training pairs left: {bad} malformed rows skipped, {report.dropped_for_length} "
            f"pairs dropped for length (max_length={cfg.max_length}, max_prompt_length={cfg.prompt_budget}){hint}"
        )

    train_keys = {m.index: m.key for m in measured}
    eval_keys: dict[int, bytes] = {}
    evals: list[EncodedPair] = []
    if cfg.eval is not None:
        rows, label = eval_rows(cfg)
        report.eval_from = f"from {label}"
        evals, eval_measured = _encode_source(rows, label, cfg, tokenizer, report)
        eval_keys = {m.index: m.key for m in eval_measured}
        if not evals:
            raise DataError(f"{label}: no eval pairs left after skipping malformed rows and dropping long pairs")
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        held = hold_out(len(train), cfg.eval_fraction, seed)
        evals = [p for k, p in enumerate(train) if k in held]
        train = [p for k, p in enumerate(train) if k not in held]
        report.eval_from = f"{cfg.eval_fraction:g} of train held out, seed {seed}"
        eval_keys = train_keys
    train_set = {train_keys[p.index] for p in train}
    report.eval_in_train = sum(eval_keys[p.index] in train_set for p in evals)
    report.train_pairs, report.eval_pairs = len(train), len(evals)
    return train, evals, report
