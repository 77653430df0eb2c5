"""Preference data: load, recognise the format, normalise, tokenise, mask, truncate, collate.

One normalised row is `{"prompt": str | list[message], "chosen": str, "rejected": str}` where a message is
`{"role": ..., "content": ...}` and chosen/rejected are the text of one assistant reply. Recognising and
normalising the formats lives in `formats.py`; this module turns rows into token ids and batches.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from jinja2.exceptions import TemplateError  # jinja2 renders chat templates; torch depends on it

from .config import DataConfig
from .errors import DataError, first_line
from .datareport import DataReport, length_stats, measure, percentile, profile
from .formats import RowError, detect_format, normalise_row

if TYPE_CHECKING:
    import datasets

__all__ = [
    "EncodedPair", "DataReport", "RowError", "load_rows", "detect_format", "normalise_row", "build_datasets",
    "collate", "render_prompt", "encode_prompt", "encode_completion", "encode_prompts", "encode_completions",
    "load_split", "eval_is_split", "train_rows", "eval_rows", "inspect_data", "percentile", "length_stats",
]  # fmt: skip

Message = dict
Prompt = Union[str, list[Message]]

# local file suffix -> the `datasets` builder that reads it (json also reads a top-level JSON array)
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}  # datasets decompresses these itself: data.jsonl.gz
# suffixes that mark a string as a file path rather than a Hub id, so a missing one is reported as a file
_FILE_SUFFIXES = set(_BUILDERS) | _COMPRESSED | {".txt", ".tsv", ".arrow", ".xlsx", ".yaml", ".yml"}
_SHOWN_BAD_ROWS = 5  # malformed rows quoted in the error message; the rest are counted


@dataclass
class EncodedPair:
    index: int  # row index in the source dataset split (0-based), for messages and caching
    prompt: Prompt  # normalised prompt (system prompt applied), kept for generation
    prompt_ids: list[int]  # rendered prompt, generation prompt included; cut from the left if too long
    chosen_ids: list[int]  # completion tokens, ends with EOS unless truncated
    rejected_ids: list[int]


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


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt. The template itself places BOS where the model wants it, so no
    special tokens are added on top; without a template, BOS is prepended when the tokenizer has one."""
    return encode_prompts(tokenizer, [render_prompt(tokenizer, prompt)])[0]


def encode_completion(tokenizer, text: str) -> list[int]:
    """Token ids of one reply, then exactly one EOS (the end-of-turn token of chat models)."""
    return encode_completions(tokenizer, [text])[0]


# Batched forms of the two above (also used by completions.py) (one call into the Rust tokenizer for a whole dataset); the single-item
# functions go through them so that training and generation cannot tokenise differently.
def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if not getattr(tokenizer, "chat_template", None) and bos is not None:
        ids = [x if x and x[0] == bos else [bos] + x for x in ids]
    return ids


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so a completion cannot be ended; set tokenizer.eos_token")
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        while ids and ids[-1] == eos:  # a reply that already ends in EOS keeps one, not two
            ids = ids[:-1]
        out.append(ids + [eos])
    return out


# ------------------------------------------------------------------------------------------------- loading


class _SplitError(DataError):
    """The source exists but has no such split."""


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSED:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def looks_like_path(source: str) -> bool:
    """A data or model name meant as a file or folder, rather than `toy` or a Hub id."""
    # Hub ids are `name` or `owner/name`; anything else with a separator or a file suffix is meant as a path
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_SUFFIXES
    )


def _load_local(source: str, *args, **kwargs) -> "datasets.DatasetDict":
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # a parse error deep inside datasets; the user needs the file and the reason
        raise DataError(f"{source}: could not be read: {first_line(exc)}") from None


def _open_local(source: str) -> "datasets.DatasetDict | None":
    """Every split of the toy data, a local file (split `train`) or folder; None for a Hub id."""
    if source == "toy":
        from .toy import toy_data_files

        return _load_local(source, "json", data_files=toy_data_files())
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_local(source, str(path))
    if path.is_file():
        suffix = _suffix(path)
        if suffix not in _BUILDERS:
            raise DataError(f"{source}: unsupported file type '{suffix}'; use .json, .jsonl, .csv or .parquet")
        return _load_local(source, _BUILDERS[suffix], data_files=str(path))
    if looks_like_path(source):
        raise DataError(f"{source}: no such file or folder")
    return None


def load_split(source: str, splits: tuple[str, ...]) -> tuple["datasets.Dataset", str]:
    """The first of `splits` that `source` has, and its name."""
    local = _open_local(source)
    if local is not None:
        for split in splits:
            if split in local:
                return local[split], split
        raise _SplitError(f"{source}: no split '{splits[0]}'; available splits: {', '.join(local)}")
    import datasets

    for split in splits:
        try:
            return datasets.load_dataset(source, split=split), split
        except ValueError as exc:
            # datasets says: Unknown split "x". Should be one of ['train', 'test'].
            if "Unknown split" not in str(exc):
                raise DataError(f"{source}: could not be loaded: {first_line(exc)}") from None
            found = re.search(r"one of \[(.*)\]", str(exc))
            available = found.group(1).replace("'", "") if found else "unknown"
            missing = _SplitError(f"{source}: no split '{splits[0]}'; available splits: {available}")
        except Exception as exc:  # network, authentication, typo: one message, no traceback
            raise DataError(
                f"could not load dataset '{source}' from the Hugging Face Hub (offline? a typo in the id? "
                f"a local file that is not there?): {first_line(exc)}"
            ) from None
    raise missing


def load_rows(source: str, split: str) -> "datasets.Dataset":
    """One split of a dataset: `toy`, a local .json/.jsonl/.csv/.parquet file (its only split is `train`),
    a local folder, or a Hub dataset id. Raises DataError: missing file, unknown split (listing the
    available ones), a Hub dataset that cannot be loaded."""
    return load_split(source, (split,))[0]


# ------------------------------------------------------------------------------------------------ building


def _truncate(p: list[int], c: list[int], r: list[int], max_length: int, max_prompt: int, bos):
    """(prompt, chosen, rejected, prompt_cut, completions_cut), or None when the pair cannot fit."""
    prompt_cut = len(p) > max_prompt
    if prompt_cut:
        # keep the end of the prompt (the question and the generation prompt); keep BOS, which models need
        head = [bos] if bos is not None and p[0] == bos and max_prompt > 1 else []
        p = head + p[len(p) - (max_prompt - len(head)) :]
    budget = max_length - len(p)
    if budget < 1:
        return None
    cuts = (len(c) > budget) + (len(r) > budget)
    c, r = c[:budget], r[:budget]
    if c == r:  # the difference was cut off: the pair no longer says which reply is better
        return None
    return p, c, r, prompt_cut, cuts


def _encode_source(
    rows, label: str, cfg: DataConfig, tokenizer, report: DataReport
) -> tuple[list[EncodedPair], list]:
    """Normalise, validate, tokenise and truncate every row of one split; update `report`'s counts.
    Returns the kept pairs and every valid row measured before truncation (dropped pairs included)."""
    if len(rows) == 0:
        raise DataError(f"{label}: no rows")
    records = rows.to_list()  # one conversion from Arrow; per-row indexing would decode row by row
    try:
        fmt = detect_format(rows.column_names, records[0])
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    report.rows_read += len(records)
    report.formats[fmt] = report.formats.get(fmt, 0) + len(records)

    bad: list[tuple[int, str]] = []
    kept = []  # (index, normalised row, rendered prompt)
    for i, record in enumerate(records):
        try:
            row = normalise_row(record, fmt, cfg.system_prompt)
            kept.append((i, row, render_prompt(tokenizer, row["prompt"])))
        except RowError as exc:
            bad.append((i, exc.reason))
        except TemplateError as exc:  # templates raise on conversations they refuse, e.g. roles out of order
            bad.append((i, f"the chat template rejected the prompt ({exc})"))
    prompts = encode_prompts(tokenizer, [text for _, _, text in kept])
    chosen = encode_completions(tokenizer, [row["chosen"] for _, row, _ in kept])
    rejected = encode_completions(tokenizer, [row["rejected"] for _, row, _ in kept])
    for (i, _, _), p in zip(kept, prompts):
        if not p:
            bad.append((i, "prompt renders to no tokens"))
    bad.sort()

    if bad and cfg.on_bad_rows == "error":
        shown = "; ".join(f"row {i}: {reason}" for i, reason in bad[:_SHOWN_BAD_ROWS])
        more = f"; and {len(bad) - _SHOWN_BAD_ROWS} more" if len(bad) > _SHOWN_BAD_ROWS else ""
        noun = "row" if len(bad) == 1 else "rows"
        raise DataError(
            f"{label}: {len(bad)} malformed {noun}: {shown}{more} (set data.on_bad_rows=skip to skip them)"
        )
    for _, reason in bad:
        report.malformed[reason] = report.malformed.get(reason, 0) + 1

    pairs, measured = [], []
    for (i, row, _), p, c, r in zip(kept, prompts, chosen, rejected):
        if not p:
            continue
        measured.append(measure(i, row, len(p), len(c), len(r)))
        cut = _truncate(p, c, r, cfg.max_length, report.max_prompt_length, tokenizer.bos_token_id)
        if cut is None:
            report.dropped_for_length += 1
            continue
        p, c, r, prompt_cut, completions_cut = cut
        report.truncated_prompts += prompt_cut
        report.truncated_completions += completions_cut
        report.truncated_pairs += bool(prompt_cut or completions_cut)
        pairs.append(EncodedPair(index=i, prompt=row["prompt"], prompt_ids=p, chosen_ids=c, rejected_ids=r))
    return pairs, measured


def eval_is_split(name: str) -> bool:
    # a bare word is a split of data.train, even if a folder of that name exists here (write ./name for that);
    # a path, a file name, `toy` or an owner/name Hub id is another dataset
    return name != "toy" and "/" not in name and not looks_like_path(name)


def train_rows(cfg: DataConfig) -> "datasets.Dataset":
    """The rows of data.train (its data.train_split), at most data.max_rows of them."""
    rows = load_rows(cfg.train, cfg.train_split)
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = rows.select(range(cfg.max_rows))
    return rows


def eval_rows(cfg: DataConfig) -> tuple["datasets.Dataset", str]:
    """(rows, label) of data.eval: a split of data.train, or another source read from its `test` split when it
    has one, else `train`. Call only when data.eval is set."""
    if eval_is_split(cfg.eval):
        try:
            return load_rows(cfg.train, cfg.eval), f"{cfg.train} [{cfg.eval}]"
        except _SplitError as exc:
            raise DataError(f"data.eval={cfg.eval} names a split of data.train that it lacks: {exc}; set data.eval "
                            "to a file or dataset, or to null to hold out data.eval_fraction of data.train") from None
    rows, split = load_split(cfg.eval, ("test", "train"))
    return rows, f"{cfg.eval} [{split}]"


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[EncodedPair], list[EncodedPair], DataReport]:
    """Training pairs, eval pairs and a report, from `cfg` (see `DataConfig`).

    `cfg.eval` is a split name of `cfg.train`, or another dataset (a file or Hub id, read from its `test`
    split when it has one, else `train`); when None, `cfg.eval_fraction` of the kept training pairs is held
    out by a shuffle seeded with `seed`. Raises DataError for anything the user must fix.
    """
    max_prompt = cfg.max_prompt_length or cfg.max_length // 2
    report = DataReport(
        source=cfg.train, rows_read=0, formats={}, malformed={}, dropped_for_length=0, truncated_prompts=0,
        truncated_completions=0, train_pairs=0, eval_pairs=0, max_length=cfg.max_length,
        max_prompt_length=max_prompt,
    )  # fmt: skip
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
            f"pairs dropped for length (max_length={cfg.max_length}, max_prompt_length={max_prompt}){hint}"
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
        n_eval = min(len(train) - 1, max(1, round(cfg.eval_fraction * len(train))))
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[:n_eval])
        evals = [p for k, p in enumerate(train) if k in held]
        train = [p for k, p in enumerate(train) if k not in held]
        report.eval_from = f"{cfg.eval_fraction:g} of train held out, seed {seed}"
        eval_keys = train_keys
    train_set = {train_keys[p.index] for p in train}
    report.eval_in_train = sum(eval_keys[p.index] in train_set for p in evals)
    report.train_pairs, report.eval_pairs = len(train), len(evals)
    return train, evals, report


def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad B pairs into one batch of 2B sequences for a single concatenated forward.

    Returns `input_ids` [2B, T] long (rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded
    with `pad_id`, T = longest sequence), `attention_mask` [2B, T] long, `loss_mask` [2B, T] bool (True exactly
    at completion tokens, EOS included) and `index` [B] long.
    """
    halves = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max((len(prompt) + len(reply) for prompt, reply in halves), default=0)
    ids, attention, loss = [], [], []
    for prompt, reply in halves:
        pad = width - len(prompt) - len(reply)
        ids.append(prompt + reply + [pad_id] * pad)
        attention.append([1] * (len(prompt) + len(reply)) + [0] * pad)
        loss.append([False] * len(prompt) + [True] * len(reply) + [False] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(halves), width),
        "attention_mask": torch.tensor(attention, dtype=torch.long).reshape(len(halves), width),
        "loss_mask": torch.tensor(loss, dtype=torch.bool).reshape(len(halves), width),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
    }


def inspect_data(recipe) -> DataReport:
    """The data report of a recipe (`lora-dpo data`): loads only the tokenizer, builds the datasets exactly
    as `train` would (same tokenisation, truncation and eval split), and returns the report. Raises
    DataError or ConfigError for what the user must fix."""
    from .model import load_tokenizer  # here, not at the top: keeps data.py free of model-side imports (cycles)

    _, _, report = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.train.seed)
    return report
