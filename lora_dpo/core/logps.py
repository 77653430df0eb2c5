"""Per-sequence completion log-probs without materialising [N, T, vocab] logits, for both batch layouts.

A causal LM's forward usually ends in `lm_head(hidden)` over every position: 4096 tokens x 128k vocab x 4
bytes is 2 GB, kept again for backward. DPO needs only log p(token) at completion positions, so we run the
decoder, keep the hidden states of those positions, and push them through the output head a chunk at a
time. Each chunk is checkpointed: backward recomputes its [chunk, vocab] logits instead of storing them,
so the peak is one chunk's logits whatever the sequence length or vocabulary.

Two layouts of a batch (data/batches.py builds both, and says which positions are scored):

    plain   one row per sequence: [prompt | chosen] and [prompt | rejected] of each pair, a 2D padding mask
    shared  one row per pair: [prompt | chosen | rejected], the prompt encoded once. A 4D attention mask keeps
            the rejected tokens from seeing the chosen ones and the rejected positions restart after the
            prompt, so every completion token sees exactly the context it has in the plain layout (same keys,
            same rotary positions) and its log-prob is the same number within float rounding.

    row:       p0 p1 p2 | c0 c1 c2 | r0 r1        (then padding)
    positions:  0  1  2 |  3  4  5 |  3  4
    r0 sees:   p0 p1 p2 |          | r0           (and r1 sees p0..p2, r0, r1)

Every batch carries `score_index` (flat index into [rows x width] of the hidden state that predicts each
scored token), `score_target` (that token) and `score_seq` (its sequence, in the plain layout's order), all
computed on the CPU by the collate function, so the forward gathers without a data-dependent shape (no
host-device sync; `sequence_logps`, for a batch given by a loss mask, finds them on the device). `completion_logps` serves every caller: training, evaluation, the reference pass, merge
verification, comparison and sampling probes.

transformers (5.x) passes a 4D mask given to a Llama/Qwen2-style decoder to its attention unchanged
(`masking_utils._preprocess_mask_arguments` returns early for a 4D tensor); SDPA takes a boolean mask (True =
attend) and eager attention adds a float mask, so the mask is built in the form the attention implementation
wants. FlashAttention 2 takes no 4D mask: the shared layout is refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# The largest transient this module makes is one chunk of float32 logits, [chunk, vocab]. Sizing the chunk from a
# byte budget rather than a token count keeps that transient (and the peak) the same whatever the vocabulary:
# 64 MiB is ~130 tokens of a 128k vocabulary, ~2100 of an 8k one; a [130, 4096] x [4096, 128k] matmul is still
# large enough to keep a GPU busy. With the exp() temporary and the gradient, a chunk costs ~3.5x its budget
# at its peak (memory/plan.py): 0.22 GiB, against 0.9 GiB at 256 MiB, on an 8 GB GPU where every GiB counts.
LOGITS_BUDGET_BYTES = 64 * 2**20

MASK_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask (the shared layout)
PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids of the shared layout; 0 is padding
SHARED_KEYS = ("segments", "position_ids")  # what a shared-layout batch adds to a plain one


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


def unwrap(model):
    """(decoder, output head, logit softcap, logit scale) of a causal LM, through a peft wrapper if there is one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings(), softcap, scale


def attention_implementation(model) -> str | None:
    """The attention implementation the loaded model runs (`config._attn_implementation`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(causal_lm.config, "_attn_implementation", None)


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


def attention_mask_4d(segments: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, W, W] mask from segments [B, W]: causal, no padding keys, rejected queries blind to chosen keys.
    Boolean (True = attend) for SDPA; additive float (0 or the dtype's min) for eager and others."""
    w = segments.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k != 0) & ~((q == REJECTED) & (k == CHOSEN))
    # a padding query attends to its own position too, so no row is empty (an empty row is NaN in SDPA)
    allowed |= torch.eye(w, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _hidden_states(model, batch: dict) -> torch.Tensor:
    """[rows, width, H] last hidden states of either layout."""
    decoder = unwrap(model)[0]
    if "segments" not in batch:
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state
    table = decoder.get_input_embeddings().weight
    mask = attention_mask_4d(batch["segments"], attention_implementation(model),
                             table.dtype if table.is_floating_point() else torch.float32)
    return decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                   use_cache=False).last_hidden_state


def completion_token_logps(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """[M] float32 log p of every scored (completion) token of a batch of either layout, in `score_seq` order
    within each sequence."""
    _, head, softcap, scale = unwrap(model)
    hidden = _hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return token_logps(flat[batch["score_index"]], batch["score_target"], head, softcap, scale, chunk_tokens)


def completion_logps(model, batch: dict, sequences: int, chunk_tokens: int | None = None) -> SequenceLogps:
    """Summed completion log-probs of the `sequences` sequences of a batch of either layout (for pairs: the
    chosen of every pair, then the rejected), so the loss code cannot tell the layouts apart."""
    lp = completion_token_logps(model, batch, chunk_tokens)
    seq = batch["score_seq"]
    zeros = torch.zeros(sequences, dtype=torch.float32, device=lp.device)
    # (index_add, not bincount: bincount reads the indices' range back to the host, a sync on a GPU)
    return SequenceLogps(sums=zeros.index_add(0, seq, lp), counts=zeros.index_add(0, seq, torch.ones_like(lp)))


def score_positions(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`score_index`, `score_target` and `score_seq` of a plain batch from its [N, T] loss mask (True at
    completion tokens): position t's hidden state predicts token t+1, so the scored positions are those where
    loss_mask[:, 1:]."""
    width = loss_mask.shape[1]
    rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)
    index = rows * width + cols
    return {"score_index": index, "score_target": input_ids.reshape(-1)[index + 1], "score_seq": rows}


def sequence_logps(model, input_ids, attention_mask, loss_mask, chunk_tokens: int | None = None) -> SequenceLogps:
    """Summed log-probs of the completion tokens of each sequence of a plain batch given by its loss mask.

    input_ids, attention_mask: [N, T]; loss_mask: [N, T] bool, True where the token at that position is a
    completion token. Returns `SequenceLogps` with [N] float32 tensors. (Collated batches carry their scored
    positions already and go to `completion_logps` directly; this finds them from the mask, a sync on a GPU.)"""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **score_positions(input_ids, loss_mask)}
    return completion_logps(model, batch, input_ids.shape[0], chunk_tokens)
