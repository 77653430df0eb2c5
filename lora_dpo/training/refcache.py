"""Reference log-probs cached on disk, keyed by a fingerprint of everything they depend on.

The reference model never changes during offline DPO, so its table of summed log-probs ([pairs, 2]: chosen,
rejected) is a pure function of four things, each one component of the fingerprint:

    data            the token ids of every pair, in order (they already reflect truncation and the template)
    tokenisation    the tokenizer (vocabulary, special tokens, chat template) and the data keys that shape ids
    base_model      name, revision or commit, a digest of a local folder's files, quantization, compute dtype,
                    attention implementation, device type, and the versions of torch, transformers, peft
                    and bitsandbytes
    reference_adapter   None while the reference is the bare base (adapter disabled); the digest of an adapter
                    folder (model/adapters.adapter_fingerprint) when the reference is an adapter

A run looks its tables up before computing them, so the reference pass is paid once per (data, model), across
epochs, runs and resumes. Any change to a component is a different key, hence a miss. A cache file that cannot
be read (truncated, corrupt, another version, a table of the wrong shape) is ignored and recomputed with a
warning, never fatal. Files are written atomically (a temporary file renamed into place).

No library does this for us: TRL keys its cache by the datasets fingerprint and a hash of the model's weights,
which reads every weight; ours hashes what defines the reference without touching the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.fingerprint import pair_ids_digest
from ..model.load import compute_dtype, model_source
from ..paths import cache_root, locked

CACHE_VERSION = 1  # part of the key: bump it when the table's meaning or the file format changes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt", ".jinja")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: str | Path) -> str:
    """Digest of a local model or adapter folder from its files' names, sizes and modification times (cheap: no
    weight is read). A rewritten file is a new digest; a copied folder too (a safe miss)."""
    folder = Path(folder)
    entries = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
            st = path.stat()
            entries.append([str(path.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return _sha(entries)


def tokenisation_component(tokenizer, data_cfg) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return _sha({
        "class": type(tokenizer).__name__,
        "vocab": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "specials": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "max_length": data_cfg.max_length, "max_prompt_length": data_cfg.max_prompt_length,
        "truncation": data_cfg.truncation,
        "system_prompt": data_cfg.system_prompt,
    })


def base_model_component(model_cfg, policy, device: torch.device) -> dict:
    name, _ = model_source(model_cfg)
    local = Path(name).is_dir()
    config = getattr(policy, "config", None)
    return {
        "name": str(Path(name).resolve()) if local else name,
        "revision": model_cfg.revision,
        "commit": getattr(config, "_commit_hash", None) if not local else None,  # a Hub branch moves; its commit does not
        "files": folder_digest(name) if local else None,
        "quantization": model_cfg.quantization,
        "double_quant": model_cfg.double_quant,
        "dtype": str(compute_dtype(model_cfg, device)),
        "attn_implementation": getattr(config, "_attn_implementation", None) or model_cfg.attn_implementation,
        "device": device.type,
        "libraries": _versions(),  # a kernel change in an upgrade may move the numbers: recompute then
    }


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def fingerprint(data: str, tokenisation: str, base_model: dict, reference_adapter: str | None = None) -> dict:
    """The cache key's components; `key(fingerprint(...))` names the file."""
    return {"version": CACHE_VERSION, "data": data, "tokenisation": tokenisation, "base_model": base_model,
            "reference_adapter": reference_adapter}


def key(components: dict) -> str:
    return _sha(components)


def default_folder() -> Path:
    return cache_root() / "reference_logps"


def resolve_folder(setting: str | None) -> Path | None:
    """`train.reference_cache`: auto -> $LORA_DPO_CACHE/reference_logps; a folder; None -> no cache."""
    if setting is None:
        return None
    return default_folder() if setting == "auto" else Path(setting).expanduser()


def load(folder: Path, components: dict, rows: int) -> torch.Tensor | None:
    """The cached [rows, 2] float32 table for these components, or None (absent, or unreadable: warned)."""
    path = folder / f"{key(components)}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads(f.metadata()["fingerprint"])
            table = f.get_tensor("reference_logps")
        if stored != json.loads(json.dumps(components)):
            raise ValueError("its fingerprint differs from the file name's")
        if table.dtype != torch.float32 or tuple(table.shape) != (rows, 2) or not torch.isfinite(table).all():
            raise ValueError(f"unexpected table {tuple(table.shape)} {table.dtype}")
        return table
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is recomputed, never fatal
        print(f"warning: ignoring the unreadable reference cache {path} ({exc.__class__.__name__}: {exc}); "
              "recomputing it", file=sys.stderr)
        return None


def save(folder: Path, components: dict, table: torch.Tensor) -> Path:
    """Write the table atomically; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key(components)}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({"reference_logps": table.detach().float().contiguous().cpu()}, tmp,
                  metadata={"fingerprint": json.dumps(components, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class ReferenceCache:
    """The trainer's view: `table(pairs, compute)` returns the cached table or computes and stores it.

    Under several processes the decision is collective (every process must find the file, or all recompute),
    because the computation itself is collective; only the main process writes."""

    def __init__(self, folder: Path | None, tokenisation: str, base_model: dict, reference_adapter: str | None,
                 accelerator=None):
        self.folder, self.accelerator = folder, accelerator
        self.tokenisation, self.base_model, self.reference_adapter = tokenisation, base_model, reference_adapter
        self.hits = self.misses = 0

    @classmethod
    def for_run(cls, recipe, tokenizer, policy, device, accelerator=None, reference_adapter: str | None = None):
        folder = resolve_folder(recipe.train.reference_cache)
        if folder is None:
            return cls(None, "", {}, None, accelerator)
        return cls(folder, tokenisation_component(tokenizer, recipe.data),
                   base_model_component(recipe.model, policy, device), reference_adapter, accelerator)

    def table(self, pairs, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.folder is None or not pairs:
            return compute()
        components = fingerprint(pair_ids_digest(pairs), self.tokenisation, self.base_model, self.reference_adapter)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            return self._table(pairs, components, compute)  # (a collective pass: the processes decide together)
        with self._lock(components):  # another run computing the same table: wait for it, then read its file
            return self._table(pairs, components, compute)

    def _lock(self, components: dict):
        """A file lock per table, so that runs started together on the same data compute it once."""
        return locked(self.folder / ".locks" / f"{key(components)}.lock",
                      f"notice: waiting for another run computing the same reference log-probs ({self.folder})")

    def _table(self, pairs, components: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = load(self.folder, components, len(pairs))
        if self._everyone(cached is not None):
            self.hits += 1
            return cached
        self.misses += 1
        table = compute()
        if self._is_main():
            try:
                save(self.folder, components, table)
            except OSError as exc:  # a read-only or full disk costs the cache, not the run
                print(f"warning: could not write the reference cache in {self.folder}: {exc}", file=sys.stderr)
        return table

    def _everyone(self, flag: bool) -> bool:
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=acc.device)
        return float(acc.reduce(t, reduction="sum")) == 0.0  # (once per table: a sync outside the step path)

    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process
