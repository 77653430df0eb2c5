"""Tokenizer, base model (4-bit NF4 or 16/32-bit) and its LoRA adapter.

One network serves as both models of DPO: with the adapter on it is the policy pi_theta, with the adapter
off (peft's `disable_adapter()`) it is the reference pi_ref. A consumer GPU holds one 4-bit base, not two.
"""

from __future__ import annotations

import contextlib
import warnings
import sys
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig
from .errors import ConfigError, first_line

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model_name(name: str) -> str:
    """`toy` is the offline toy model (built on first use); anything else is a Hub id or a local folder."""
    if name == "toy":
        from .toy import toy_model_path

        return str(toy_model_path())
    return name


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the base model computes in. auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    (bf16 matmuls on most CPUs are emulated and slower than fp32)."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def four_bit_available(device: torch.device) -> str | None:
    """None when 4-bit NF4 can run on `device`, else the reason it cannot."""
    if device.type not in ("cuda", "cpu", "xpu"):
        return f"bitsandbytes 4-bit does not run on {device.type}"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes is not usable here ({exc.__class__.__name__}: {exc})"
    return None


def load_model_config(cfg: ModelConfig):
    """The model's configuration alone (AutoConfig: a Hub id or a local folder; no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_name(cfg.name), revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot read a model configuration from '{cfg.name}': {first_line(exc)}") from None


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, right-padded, with a pad token (its EOS when it has none: padding is always
    masked out, so the pad id never reaches a loss)."""
    from transformers import AutoTokenizer

    name = resolve_model_name(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
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
        from bitsandbytes.nn import Linear4bit
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
    storage = torch.uint8 if cfg.quant_storage == "uint8" else _DTYPES[cfg.quant_storage]
    if sharded and storage != dtype:
        raise ConfigError(
            f"model.quant_storage: FSDP / DeepSpeed ZeRO-3 shard the 4-bit weights only when they are stored in the "
            f"compute dtype ({str(dtype).removeprefix('torch.')}), got {cfg.quant_storage}; leave it at auto"
        )
    return storage


def load_base_model(cfg: ModelConfig, device: torch.device, sharded: bool = False):
    """The frozen base model, in 4-bit NF4 with double quantisation when asked and possible, else 16/32-bit.
    `sharded`: FSDP or DeepSpeed ZeRO-3 will split it across processes (no device map; see quant_storage_dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = resolve_model_name(cfg.name)
    dtype = compute_dtype(cfg, device)
    kwargs = dict(revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
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


POLICY = "default"  # peft's name of the adapter that trains
REFERENCE = "reference"  # a frozen adapter that, when present, is pi_ref (an SFT start, an iterative round)


def _enable_checkpointing(model) -> None:
    # non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings stay frozen
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model, cfg: LoraConfig, gradient_checkpointing: bool):
    """Wrap `model` in a peft LoRA adapter named `default`; only the adapter trains."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if gradient_checkpointing:
        _enable_checkpointing(model)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft asks for a name transformers 5 deprecated; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {first_line(exc)}") from None


def resolve_adapter(path: str, key: str = "model.adapter") -> Path:
    """The peft adapter folder named by `path`: the folder itself, or a run directory's adapter/."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"{key}: no LoRA adapter in '{path}' (expected adapter_config.json there or in {folder / 'adapter'})")


def load_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig, device: torch.device, sharded: bool = False,
                reference_adapter: bool = False):
    """Base + LoRA adapter: the policy.

    Fresh adapter (the usual case): the reference is the policy with its adapter disabled, the bare base.
    `model_cfg.adapter` set: the policy starts as a copy of that adapter (an SFT run's, say) and the adapter
    itself, frozen, is loaded beside it as REFERENCE: two adapters on one 4-bit base, and the reference is
    the model the user started from, never silently the bare base. `reference_adapter`: give a fresh policy
    a REFERENCE adapter too (a copy of it, see `snapshot_reference`), for iterative rounds."""
    base = load_base_model(model_cfg, device, sharded)
    if not model_cfg.adapter:
        policy = attach_lora(base, lora_cfg, model_cfg.gradient_checkpointing)
        if reference_adapter:
            policy.add_adapter(REFERENCE, policy.peft_config[POLICY])
            policy.set_adapter(POLICY)
            _freeze_reference(policy)
            snapshot_reference(policy)
        return policy
    from peft import PeftModel

    folder = resolve_adapter(model_cfg.adapter)
    if model_cfg.gradient_checkpointing:
        _enable_checkpointing(base)
    try:
        policy = PeftModel.from_pretrained(base, str(folder), adapter_name=POLICY, is_trainable=True)
        policy.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"model.adapter: cannot attach '{model_cfg.adapter}' to {model_cfg.name}: {first_line(exc)}") from None
    policy.set_adapter(POLICY)
    _freeze_reference(policy)
    return policy


def _freeze_reference(model) -> None:
    """The REFERENCE adapter is a fixed function: no dropout, whatever lora.dropout the policy trains with (peft
    would apply it in train mode, making pi_ref random in every per-step reference pass)."""
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and REFERENCE in dropout:
            dropout[REFERENCE] = torch.nn.Identity()


def snapshot_reference(model) -> None:
    """Copy the policy adapter's weights into the REFERENCE adapter: from now on pi_ref is the policy as it is
    (iterative DPO: the end of one round is the next round's reference; no merge, no second model)."""
    params = dict(model.named_parameters())
    tag, src = f".{REFERENCE}.", f".{POLICY}."
    with torch.no_grad():
        for name, p in params.items():
            if tag in name:
                p.copy_(params[name.replace(tag, src)])


def has_reference_adapter(model) -> bool:
    return REFERENCE in getattr(model, "peft_config", {})


@contextlib.contextmanager
def reference_model(model):
    """Inside this block `model` is pi_ref and no graph is built: the REFERENCE adapter when the model has one
    (a run started from an adapter, or an iterative round), else the base with the adapter disabled."""
    if not has_reference_adapter(model):
        with model.disable_adapter(), torch.no_grad():
            yield model
        return
    active = model.active_adapter
    model.set_adapter(REFERENCE, inference_mode=True)  # (frozen: its weights never train)
    try:
        with torch.no_grad():
            yield model
    finally:
        model.set_adapter(active)  # the policy's adapter active and trainable again, the reference frozen


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model, tokenizer, folder: str | Path, state_dict: dict | None = None) -> None:
    """Write the adapter in peft's format with the tokenizer files beside it. `state_dict`: the adapter's
    weights gathered from processes that each hold a shard of them (FSDP, ZeRO-3)."""
    model.save_pretrained(str(folder), state_dict=state_dict, selected_adapters=[POLICY])
    tokenizer.save_pretrained(str(folder))


def load_round_reference(policy, out: Path, finished_rounds: int) -> None:
    """On resume in round k + 1: the reference is the adapter saved when round k ended."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = out / "rounds" / f"round-{finished_rounds}" / "adapter_model.safetensors"
    if not path.is_file():
        from .errors import UserError

        raise UserError(f"resume: {path} is missing: it holds the reference of round {finished_rounds + 1}")
    set_peft_model_state_dict(policy, load_file(str(path)), adapter_name=REFERENCE)
