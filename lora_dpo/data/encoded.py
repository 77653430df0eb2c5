"""Rows tokenised once: `datasets.map` over a split, cached on disk under a fingerprint of everything that decides
the tokens, so `lora-dpo data`, `plan` and `train` of one recipe tokenise once and later runs read the cache.

The fingerprint covers the rows (datasets' own fingerprint of the split: the file, its size and time), their
format, the tokenizer (its vocabulary, merges, normaliser, chat template and special tokens), the system prompt,
and the source of the modules that normalise and tokenise. The map keeps every row's token ids before truncation
and the reason a row is malformed; truncation, which depends on data.max_length, runs after it, so another
max_length reuses the cache. A split read into memory rather than from a file (a list of rows given to
`lora_dpo.train`) is mapped again each time: datasets caches only what lives in files.

Large splits map in several processes (`num_proc`): the chat template renders in Python, one row at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import datasets

from ..progress import phase

# Below this much text one process maps faster than starting several: on 2 cores the toy world's 2000 short rows
# (0.5 MB) took 0.6 s in one process and 1.3 s in two; 500 real chat pairs (2.5 MB) 1.6 s and 1.2 s; 20,000 of
# them 52 s and 30 s (benchmarks/RESULTS.md)
NUM_PROC_BYTES = 2 * 2**20
MAX_PROC = 8
BATCH_ROWS = 500  # rows per call of the encoding function: one tokenizer call per batch

# the modules whose code decides the token ids a row becomes
CODE = ("encoded.py", "examples.py", "formats.py", "pairs.py", "tokenize.py")


def code_digest() -> str:
    h = hashlib.sha256()
    for name in CODE:
        h.update(Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A digest of what decides the tokenizer's ids: a fast tokenizer's serialised pipeline (its padding and
    truncation settings left out: they change when it is used, not what it encodes), the chat template and the
    special tokens. Two loads of one tokenizer give one digest."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("padding", None), state.pop("truncation", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id,
               tokenizer.all_special_tokens]
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()


def processes(rows: datasets.Dataset) -> int | None:
    """`num_proc` for a split: one process under NUM_PROC_BYTES of Arrow data, else one per core (at most
    MAX_PROC)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_PROC, len(rows)) if rows.data.nbytes >= NUM_PROC_BYTES and cores > 1 else None


def encode_rows(rows: datasets.Dataset, encode: Callable[[dict, list[int]], dict], features: datasets.Features, *,
                label: str, key: list) -> datasets.Dataset:
    """`rows` mapped by `encode(batch, indices) -> columns` (batched; it may return more or fewer rows than it
    got), with `features`; read from the cache when the same rows were encoded before with the same `key` (the
    format, the tokenizer's digest, the settings the encoding depends on) and the same code."""
    fingerprint = hashlib.sha256(json.dumps([rows._fingerprint, key, code_digest()]).encode()).hexdigest()[:32]
    num_proc = processes(rows)
    if num_proc:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: no thread pool from the parent
    # (datasets draws its own bar; the run's progress.json has the phase, done when the map is)
    with phase("tokenising data", total=len(rows), unit="row", detail=f"tokenising {label}") as mapped:
        table = rows.map(encode, batched=True, batch_size=BATCH_ROWS, with_indices=True,
                         remove_columns=rows.column_names, features=features, new_fingerprint=fingerprint,
                         num_proc=num_proc, desc=f"tokenising {label}")
        mapped.advance(len(rows))
    return table


def records(batch: dict[str, list]) -> list[dict]:
    """A batch of datasets.map (a dict of columns) as rows."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def ids() -> datasets.List:
    return datasets.List(datasets.Value("int32"))
