"""Bases from GGUF files (llama.cpp's format, `model.gguf_file`): transformers reads one with the `gguf` package and
dequantises it into an ordinary model; lora-dpo does that once per file and keeps the result as a plain folder in
the cache (`$LORA_DPO_CACHE/gguf/<name>-<digest>/`), which then loads like any base: in 4-bit NF4 or in 16/32 bits,
with its tokenizer and chat template, for training, export and compare alike.

Why a folder and not `from_pretrained(..., gguf_file=...)` at every load: the dequantisation takes tens of seconds,
and transformers cannot quantise a GGUF checkpoint to NF4 as it loads it. The folder's weights are fp32, exactly
the dequantised values (bf16 would round them), and `SOURCE` in it records where they came from (the card of an
export names it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ConfigError, first_line
from ..paths import build_once, cache_root
from ..progress import say
from .index import file_digest

SOURCE = "lora_dpo_source.json"  # in the dequantised folder: {"gguf_file", "sha256", "from", ...}


def gguf_path(source: str, gguf_file: str, revision: str | None) -> Path:
    """The GGUF file: `gguf_file` inside the local folder `source`, or downloaded from the Hub repository `source`."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
            raise ConfigError(f"model.gguf_file: {gguf_file} is not in {folder} (GGUF files there: {found})")
        return path
    try:
        return Path(hf_hub_download(source, gguf_file, revision=revision))
    except Exception as exc:  # offline, a typo, no such file: one message
        raise ConfigError(f"model.gguf_file: cannot get {gguf_file} from '{source}': {first_line(exc)}") from None


def dequantised(source: str, gguf_file: str, revision: str | None = None, origin: dict | None = None) -> Path:
    """The folder of the model in `gguf_file` (in the folder or Hub repository `source`), dequantised once.
    `origin`: more to record in its SOURCE (where the GGUF file itself came from)."""
    path = gguf_path(source, gguf_file, revision)
    digest = file_digest(path)
    target = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{digest[:16]}"
    record = {"gguf_file": Path(gguf_file).name, "sha256": digest, "from": source, **(origin or {})}
    return build_once(target, lambda folder: _convert(path, folder, record), f"the model of {Path(gguf_file).name}")


def _convert(path: Path, folder: Path, record: dict) -> None:
    say(f"lora-dpo: dequantising {path.name} into {folder.parent} (once; tens of seconds) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        raise ConfigError(f"model.gguf_file: reading GGUF files needs the `gguf` package: pip install gguf "
                          f"({first_line(exc)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model.gguf_file: transformers cannot read {path.name}: {first_line(exc)}") from None
    plain = unpacked(model, torch.float32)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / SOURCE).write_text(json.dumps(record, indent=2) + "\n")


def unpacked(model, dtype: torch.dtype):
    """A model read from a GGUF file as an ordinary one in `dtype`: transformers keeps a GGUF checkpoint's weights
    packed and dequantises them at every matmul, refuses to save them, and a later load of what it saved would look
    for the GGUF file; the model rebuilt from the state dict holds the same (dequantised) values as plain tensors."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model.to(dtype)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def origin(folder: str | Path) -> dict | None:
    """What a dequantised folder was made from (its SOURCE), or None for any other model."""
    path = Path(folder) / SOURCE
    return json.loads(path.read_text()) if path.is_file() else None
