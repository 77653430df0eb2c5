"""Tiled MLP: each decoder layer's MLP runs over the sequence a slice of tokens at a time (`train.mlp_chunks`).

An MLP acts on each token alone, so cutting the tokens into slices changes no value. What it changes is memory:
the MLP's intermediates ([tokens, intermediate] for gate, up, the activation and their product; 14336 wide on
an 8B Llama, 3.5x the hidden size) are the largest part of what backward keeps of a layer. Each slice is
checkpointed, so backward holds one slice's intermediates at a time: with gradient checkpointing, the peak of
the layer being recomputed drops by about (1 - 1/chunks) of its MLP part, at the price of one more forward of
each MLP per step. Without gradients (reference pass, evaluation) the slices only bound the transient.
tests/model/test_tiling.py pins equal log-probs and gradients and the lower peak.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .checkpointing import decoder_layers


def _tiled_forward(forward, chunks: int, x: torch.Tensor, *args, **kwargs):
    if chunks <= 1 or x.dim() < 2 or x.shape[-2] < 2 or args or kwargs:
        return forward(x, *args, **kwargs)
    parts = x.chunk(chunks, dim=-2)  # slices of tokens
    if torch.is_grad_enabled():
        outs = [checkpoint(forward, part, use_reentrant=False) for part in parts]
    else:
        outs = [forward(part) for part in parts]
    return torch.cat(outs, dim=-2)


def _dense_mlps(model):
    return [layer.mlp for layer in decoder_layers(model)
            if isinstance(getattr(layer, "mlp", None), torch.nn.Module) and not hasattr(layer.mlp, "experts")]


def tile_mlps(model, chunks: int) -> int:
    """Make every dense MLP of the model's decoder layers run in `chunks` slices of tokens (1: as it was).
    Returns the number of MLPs tiled. Mixture-of-experts blocks are left whole (their router's balancing loss
    sees the whole batch); a model with no dense MLP at all is an error naming the key."""
    mlps = _dense_mlps(model)
    if chunks > 1 and not mlps:
        raise ConfigError(f"train.mlp_chunks: {type(model).__name__} has no dense MLP in its decoder layers to tile; "
                          "set train.mlp_chunks=1")
    for mlp in mlps:
        original = mlp.__dict__.get("_untiled_forward") or mlp.forward
        mlp._untiled_forward = original
        mlp.forward = original if chunks <= 1 else functools.partial(_tiled_forward, original, chunks)
    return len(mlps)
