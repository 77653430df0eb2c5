"""The LoRA adapter on the base: the policy, and the reference it is measured against.

One network serves as both models of DPO: with the adapter on it is the policy pi_theta, with the adapter off
(peft's `disable_adapter()`) it is the reference pi_ref. A consumer GPU holds one 4-bit base, not two. When the
reference is itself an adapter (an SFT start, an iterative round), a second, frozen adapter named REFERENCE sits
beside the policy's on the same base.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ..config import LoraConfig, ModelConfig
from ..errors import ConfigError, UserError, first_line
from ..run.rundir import RunDir
from .load import load_base_model

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
    for candidate in (folder, RunDir(folder).adapter):
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


def write_adapter(model, folder: str | Path, state_dict: dict | None = None) -> None:
    """Write the policy's adapter (not the frozen reference) in peft's format. `state_dict`: its weights gathered
    from processes that each hold a shard of them (FSDP, ZeRO-3)."""
    model.save_pretrained(str(folder), state_dict=state_dict, selected_adapters=[POLICY])


def save_adapter(model, tokenizer, folder: str | Path, state_dict: dict | None = None) -> None:
    """Write the adapter in peft's format with the tokenizer files beside it (`write_adapter`)."""
    write_adapter(model, folder, state_dict)
    tokenizer.save_pretrained(str(folder))


def load_adapter_weights(model, folder: Path, adapter_name: str = POLICY, holds: str = "the adapter") -> None:
    """Load a saved adapter's weights (a checkpoint's, or a round's) into the adapter `adapter_name`; a missing
    file is a UserError saying what it `holds`."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"resume: {path} is missing: it holds {holds}")
    set_peft_model_state_dict(model, load_file(str(path)), adapter_name=adapter_name)


def adapter_fingerprint(folder: str | Path | None) -> str | None:
    """A digest of an adapter's weights (bytes) and config: what the reference is, when it is base + this adapter,
    for the reference cache's key. None (the bare base) when `folder` is None."""
    if folder is None:
        return None
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
