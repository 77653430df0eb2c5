"""Tokenizer and base model (4-bit NF4 or 16/32-bit), loaded as a recipe's `model` section says.

`model.name` is a Hub id, a local folder, or a registered name (names.py: `toy`, whose base ships with the
package). An example model's Hub id loads its example copy where the Hub cannot give it (examples.py); a
`model.gguf_file` in that folder or repository loads through its dequantised folder (gguf.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .. import names
from ..config import ModelConfig
from ..errors import ConfigError, UserError, first_line
from . import examples, gguf

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model_name(name: str) -> str:
    """A registered name (`toy`) is its folder; an example model's Hub id is its example copy where the Hub cannot
    give it (examples.py); anything else is a Hub id or a local folder."""
    folder = names.lookup("model", name)
    if folder is not None:
        return str(folder())
    return examples.stand_in(name) or name


def base_path(name: str, revision: str | None = None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(where the base loads from, at which revision): `resolve_model_name`, or for a GGUF file in that folder or
    Hub repository its dequantised folder (which has no revision)."""
    name = resolve_model_name(name)
    if gguf_file:
        return str(gguf.dequantised(name, gguf_file, revision)), None
    return name, revision


def model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """`base_path` of a recipe's model section."""
    return base_path(cfg.name, cfg.revision, cfg.gguf_file)


def base_origin(cfg: ModelConfig) -> dict | None:
    """Where a base from a GGUF file came from (gguf.SOURCE of its dequantised folder: the file, its digest, the
    package of an example copy), None for any other base: a run records it, the card of an export names it."""
    return gguf.origin(model_source(cfg)[0])


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the base model computes in. auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    (bf16 matmuls on most CPUs are emulated and slower than fp32)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def four_bit_available(device: torch.device) -> str | None:
    """None when 4-bit NF4 can run on `device`, else the reason it cannot."""
    if device.type not in ("cuda", "cpu", "xpu"):
        return f"bitsandbytes 4-bit does not run on {device.type}"
    try:
        import bitsandbytes  # noqa: F401, PLC0415 - optional heavy dependency: its absence is a reason, not an error
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes is not usable here ({exc.__class__.__name__}: {exc})"
    return None


def load_model_config(cfg: ModelConfig):
    """The model's configuration alone (AutoConfig: a Hub id or a local folder; no weights are read)."""
    try:
        name, revision = model_source(cfg)
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot read a model configuration from '{cfg.name}': {first_line(exc)}") from None


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, right-padded, with a pad token (its EOS when it has none: padding is always
    masked out, so the pad id never reaches a loss)."""
    name, revision = model_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot load a tokenizer from '{cfg.name}': {first_line(exc)}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"model.name: the tokenizer of '{cfg.name}' has no EOS token; completions need one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Guard against a bitsandbytes 0.50 trap on CPUs with AVX512-BF16.

    The first forward of a `Linear4bit` in eval mode without gradients (a reference pass, an evaluation, a
    generation) repacks its weight for a CPU inference kernel that has no backward; from then on the layer
    passes no gradient to its input, in train mode too, and every LoRA parameter upstream silently gets a
    wrong gradient. Switching the repacking off costs a little CPU inference speed and nothing on GPUs.
    Returns the number of layers guarded.
    """
    try:
        from bitsandbytes.nn import Linear4bit  # noqa: PLC0415 - optional heavy dependency
    except Exception:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quant_storage_dtype(cfg: ModelConfig, dtype: torch.dtype, sharded: bool) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in. FSDP and DeepSpeed ZeRO-3 shard a model by flattening
    its parameters, which must then share one floating dtype: the compute dtype. Unsharded, uint8 (the default
    of bitsandbytes) is the plain choice."""
    if cfg.quant_storage == "auto":
        return dtype if sharded else torch.uint8
    storage = torch.uint8 if cfg.quant_storage == "uint8" else DTYPES[cfg.quant_storage]
    if sharded and storage != dtype:
        raise ConfigError(
            f"model.quant_storage: FSDP / DeepSpeed ZeRO-3 shard the 4-bit weights only when they are stored in the "
            f"compute dtype ({str(dtype).removeprefix('torch.')}), got {cfg.quant_storage}; leave it at auto"
        )
    return storage


def load_base_model(cfg: ModelConfig, device: torch.device, sharded: bool = False):
    """The frozen base model, in 4-bit NF4 with double quantisation when asked and possible, else 16/32-bit.
    `sharded`: FSDP or DeepSpeed ZeRO-3 will split it across processes (no device map; see quant_storage_dtype)."""
    name, revision = model_source(cfg)
    dtype = compute_dtype(cfg, device)
    kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization == "nf4":
        reason = four_bit_available(device)
        if reason is None:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=quant_storage_dtype(cfg, dtype, sharded),
            )
        else:
            print(f"notice: 4-bit NF4 unavailable ({reason}); loading the base in {dtype}", file=sys.stderr)
    if device.type == "cuda" and not sharded:
        # quantised weights are placed as they load, never staged whole in CPU memory (a sharding engine
        # places them itself: accelerate sets transformers up to load them for FSDP / ZeRO-3)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot load a causal LM from '{cfg.name}': {first_line(exc)}") from None
    if device.type != "cuda" and "quantization_config" not in kwargs:
        model.to(device)
    disable_cpu_repacking(model)
    model.requires_grad_(False)
    model.config.use_cache = False  # the KV cache is for generation; training would only store it
    return model


def load_tokenizer_for(adapter_dir: Path, cfg: ModelConfig):
    """The tokenizer an adapter was trained with: saved beside it by the trainer, or else (a checkpoint, a bare
    peft adapter) the base's, prepared as the trainer prepares it."""
    if (adapter_dir / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(adapter_dir))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer in {adapter_dir}: {first_line(exc)}") from None
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(cfg)
