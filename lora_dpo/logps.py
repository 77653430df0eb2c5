"""Per-sequence completion log-probs without materialising [N, T, vocab] logits.

A causal LM's forward usually ends in `lm_head(hidden)` over every position: 4096 tokens x 128k vocab x 4
bytes is 2 GB, kept again for backward. DPO needs only log p(token) at completion positions, so we run the
decoder, keep the hidden states of those positions, and push them through the output head a chunk at a
time. Each chunk is checkpointed: backward recomputes its [chunk, vocab] logits instead of storing them,
so the peak is one chunk's logits whatever the sequence length or vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# The largest transient this module makes is one chunk of float32 logits, [chunk, vocab]. Sizing the chunk from a
# byte budget rather than a token count keeps that transient (and the peak) the same whatever the vocabulary:
# 64 MiB is ~130 tokens of a 128k vocabulary, ~2100 of an 8k one; a [130, 4096] x [4096, 128k] matmul is still
# large enough to keep a GPU busy. With the exp() temporary and the gradient, a chunk costs ~3.5x its budget
# at its peak (plan.py): 0.22 GiB, against 0.9 GiB at 256 MiB, on an 8 GB GPU where every GiB counts.
LOGITS_BUDGET_BYTES = 64 * 2**20


def chunk_tokens_for(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits [chunk, vocab] fit in `budget_bytes`."""
    return max(1, budget_bytes // (4 * max(1, vocab_size)))


@dataclass
class SequenceLogps:
    sums: torch.Tensor  # [N] float32: sum of log p over each sequence's completion tokens
    counts: torch.Tensor  # [N] float32: number of completion tokens per sequence

    def averaged(self) -> torch.Tensor:
        """[N] mean log-prob per completion token (length-normalised)."""
        return self.sums / self.counts.clamp(min=1)


def _unwrap(model):
    """(decoder, output head, logit transform) of a causal LM, through a peft wrapper if there is one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings(), softcap, scale


def _chunk_logps(hidden, targets, head, softcap, scale):
    logits = head(hidden).float()  # [c, V]: float32 so that the log-softmax of a bf16 model is exact enough
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden, targets, head, softcap=None, scale=None, chunk_tokens: int | None = None):
    """log p(targets[i] | hidden[i]) for M positions.

    hidden: [M, H] last hidden states; targets: [M] long; head: the output projection (a module).
    chunk_tokens: positions per chunk; None sizes chunks by LOGITS_BUDGET_BYTES.
    Returns [M] float32. With grad enabled each chunk is recomputed in backward (activation checkpointing).
    """
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(getattr(head, "out_features", None) or head.weight.shape[0])
    out = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logps, h, t, head, softcap, scale, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, t, head, softcap, scale))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, input_ids, attention_mask, loss_mask, chunk_tokens: int | None = None):
    """Summed log-probs of the completion tokens of each sequence.

    input_ids, attention_mask: [N, T]; loss_mask: [N, T] bool, True where the token at that position is a
    completion token. Position t's hidden state predicts token t+1, so the hidden states [:, :-1] are scored
    against input_ids[:, 1:] where loss_mask[:, 1:]. Returns `SequenceLogps` with [N] float32 tensors.
    """
    decoder, head, softcap, scale = _unwrap(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mask = loss_mask[:, 1:]
    rows = mask.nonzero(as_tuple=True)[0]  # [M] which sequence each scored token belongs to
    lp = token_logps(hidden[:, :-1][mask], input_ids[:, 1:][mask], head, softcap, scale, chunk_tokens)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
    return SequenceLogps(sums=sums, counts=mask.sum(-1).float())
