"""Activation offloading: the tensors autograd keeps for backward live in CPU memory until backward needs them.

With gradient checkpointing a step keeps, per decoder layer, the layer's input ([sequences, tokens, hidden]);
for a 32-layer 8B model and 2 x 2048 tokens that is ~1 GB of GPU memory in bf16. Under this context they are
copied to (pinned) CPU memory as they are saved and copied back in backward, for the time of two PCIe copies
per layer. It only moves tensors, so values and gradients are unchanged (tests/test_offload.py pins that).
torch provides the mechanism (`torch.autograd.graph.save_on_cpu`); this module only decides when to use it.
"""

from __future__ import annotations

import contextlib

import torch


def activation_offload(enabled: bool, device: torch.device):
    """Context for the forward whose saved activations should wait on the CPU (`train.activation_offload`).
    A no-op when disabled; on a CPU device the tensors already live in CPU memory and nothing is copied."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
