"""Offloading to CPU memory: what a step keeps but rarely touches waits in CPU memory instead of on the GPU.

Activations (`train.activation_offload`): the tensors autograd keeps for backward live in CPU memory until
backward needs them. With gradient checkpointing a step keeps, per decoder layer, the layer's input ([sequences, tokens, hidden]);
for a 32-layer 8B model and 2 x 2048 tokens that is ~1 GB of GPU memory in bf16. Under this context they are
copied to (pinned) CPU memory as they are saved and copied back in backward, for the time of two PCIe copies
per layer. It only moves tensors, so values and gradients are unchanged (tests/model/test_offload.py pins that).
torch provides the mechanism (`torch.autograd.graph.save_on_cpu`); this module only decides when to use it.
"""

from __future__ import annotations

import contextlib

import torch


def activation_offload(enabled: bool, device: torch.device):
    """Context for the forward whose saved activations should wait on the CPU (`train.activation_offload`).
    A no-op when disabled; on a CPU device the tensors already live in CPU memory and nothing is copied."""
    if not enabled or device.type == "cpu":  # (save_on_cpu would copy every saved tensor, to where it already is)
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def embeddings_on_cpu(model, device: torch.device) -> int:
    """Keep the input embedding table in CPU memory (`train.embeddings_on_cpu`); returns the bytes it frees on
    `device`. A lookup reads one row per token, so the table need not sit beside the matmuls: the token ids go to
    the CPU, the looked-up rows ([tokens, hidden], 25 MB for 3072 tokens of an 8B model) come back. On an 8B
    Llama with its 128k vocabulary the table is 1.05 GB in bf16, an eighth of an 8 GB GPU. The table is frozen
    (only the adapter trains), so no gradient crosses back. A model whose head shares the table (tied
    embeddings) keeps it where it is: the head needs it on the device, and a copy would save nothing."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    table, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    if device.type == "cpu" or table.weight.device.type == "cpu":
        return 0
    if head is not None and head.weight is table.weight:
        return 0
    freed = table.weight.numel() * table.weight.element_size()
    table.to("cpu")
    table.register_forward_pre_hook(lambda _m, args: (args[0].to("cpu"), *args[1:]))
    table.register_forward_hook(lambda _m, _args, out: out.to(device, non_blocking=False))
    return freed
