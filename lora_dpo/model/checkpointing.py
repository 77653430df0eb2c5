"""Gradient checkpointing sized to the device (`model.gradient_checkpointing: auto`, the default).

Checkpointing a decoder layer keeps only its input for backward and recomputes the rest there: far less
memory, one more forward of that layer per step. Checkpointing every layer is what a small GPU needs; on a GPU
with room to spare it costs a quarter to a third of each step for memory nobody uses. `auto` checkpoints the
fewest layers whose predicted peak (memory/plan.py's memory model, from the model's configuration and the widest
batch of the training data) fits in the memory the device has free, with AUTO_HEADROOM to spare, and spreads
them evenly over the stack. Which layers recompute changes no value: only what is kept for backward.

Where the prediction cannot be made (a configuration the memory model does not read, a device whose free
memory torch cannot report, online DPO, whose generation the model does not count, activation offload, the
smallest-GPU mode) every layer is checkpointed, as `true` does.
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..config import Recipe
from ..memory.plan import ALLOCATOR_SLACK, Setting, fewest_checkpointed, shape_from_config

AUTO_HEADROOM = 0.85  # the share of the free memory `auto` plans for: the planner's error (+6% on the GPU peaks
# measured so far, within 8% on the CPU), the allocator's fragmentation, and whatever else starts on the device


def auto_budget(free: int) -> int:
    """The allocated peak `auto` plans for when `free` bytes are free to this process (the allocator's slack
    comes on top of what is allocated)."""
    return int(free * AUTO_HEADROOM / (1 + ALLOCATOR_SLACK))


def decoder_layers(model) -> list:
    """The layers of the model's decoder (the language model's in a multimodal model: the layers the memory
    model counts), in order; a peft model's base model's."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(causal_lm.get_decoder(), "layers", None) or [])


def spread(k: int, n: int) -> list[bool]:
    """Which of n layers to checkpoint so that k of them are, evenly spaced."""
    return [(i + 1) * k // n > i * k // n for i in range(n)]


def checkpoint_layers(model, k: int) -> int:
    """Checkpoint k of the model's decoder layers (evenly spread); the others keep their activations. The
    model's checkpointing must have been enabled (it sets the function each layer calls). Returns the layers'
    count."""
    layers = decoder_layers(model)
    for layer, on in zip(layers, spread(min(k, len(layers)), len(layers))):
        layer.gradient_checkpointing = on
    return len(layers)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may allocate on `device` in all: on CUDA the free memory plus what the caching
    allocator already holds; on a Linux CPU, MemAvailable (a lower bound: the model already loaded is not in
    it). None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def cannot_predict(recipe, model_config) -> str | None:
    """Why the memory model cannot size this run's checkpointing (then auto checkpoints every layer), or None."""
    if recipe.online.enabled:
        return "online DPO: its generation's memory is not in the memory model"
    if recipe.train.activation_offload:
        return "train.activation_offload: every layer's input goes to the CPU"
    text = getattr(model_config, "text_config", None) or model_config
    if any(getattr(text, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        return "a mixture of experts is not in the memory model"
    return None


def resolve_auto(recipe: Recipe, widths, model_config, device: torch.device, shared: bool) -> tuple[int | None, str]:
    """(layers to checkpoint, why) for `model.gradient_checkpointing: auto`; None: every layer (the prediction
    cannot be made). `widths`: the training pairs' widths (data/order.pair_widths; they size the worst batch), or
    None for examples that are not pairs (the memory model then takes every sequence at max_length: a larger,
    safe estimate); `shared`: the run's layout."""
    if (why := cannot_predict(recipe, model_config)) is not None:
        return None, why
    budget = available_memory(device)
    if budget is None:
        return None, f"the free memory of {device.type} cannot be read"
    try:
        shape = shape_from_config(model_config)
    except (AttributeError, TypeError) as exc:
        return None, f"the memory model does not read this configuration ({exc})"
    setting = Setting.of(recipe, widths, shared)
    k = fewest_checkpointed(shape, setting, auto_budget(budget))
    gib = budget / 2**30
    if k is None:
        return shape.layers, f"even every layer checkpointed is predicted over {AUTO_HEADROOM:.0%} of {gib:.1f} GiB"
    return k, f"the fewest whose predicted peak fits {AUTO_HEADROOM:.0%} of the {gib:.1f} GiB free on {device.type}"


def apply_auto(recipe: Recipe, policy, widths, device: torch.device, shared: bool = False) -> tuple[int, int, str] | None:
    """Resolve `model.gradient_checkpointing: auto` on the loaded policy (its checkpointing enabled on every
    layer by load_policy): (layers checkpointed, layers, the line the run logs), or None when the recipe does
    not say auto. `widths`, `shared`: as for `resolve_auto`."""
    if recipe.model.gradient_checkpointing != "auto":
        return None
    layers = decoder_layers(policy)
    n = len(layers)
    if not layers or not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        # (remote code whose layers checkpoint their own way: left as load_policy set them, every layer)
        return n, n, "gradient checkpointing (auto): every layer (not transformers' checkpointing layers)"
    k, why = resolve_auto(recipe, widths, policy.config, device, shared)
    k = n if k is None else k
    checkpoint_layers(policy, k)
    return k, n, f"gradient checkpointing (auto): {k} of {n} layers ({why})"
