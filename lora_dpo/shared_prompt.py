"""Shared-prompt batches: a pair as one sequence [prompt | chosen | rejected], its prompt encoded once.

The plain layout (data.collate) runs prompt+chosen and prompt+rejected as two rows, so every prompt token goes
through the network twice. Here each pair is one row; a 4D attention mask keeps the rejected tokens from seeing
the chosen ones, and the rejected positions restart after the prompt, so every completion token sees exactly
the context it has in the plain layout (same keys, same rotary positions) and its log-prob is the same number
within float rounding. The first token of each completion is predicted from the prompt's last hidden state,
which serves both.

    row:       p0 p1 p2 | c0 c1 c2 | r0 r1        (then padding)
    positions:  0  1  2 |  3  4  5 |  3  4
    r0 sees:   p0 p1 p2 |          | r0           (and r1 sees p0..p2, r0, r1)

transformers (5.x) passes a 4D mask given to a Llama/Qwen2-style decoder to its attention unchanged
(`masking_utils._preprocess_mask_arguments` returns early for a 4D tensor); SDPA takes a boolean mask (True =
attend) and eager attention adds a float mask, so the mask is built in the form the attention implementation
wants. FlashAttention 2 takes no 4D mask: the layout is refused there.
"""

from __future__ import annotations

import torch

from .logps import SequenceLogps, _unwrap, token_logps

PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids; 0 is padding


def collate_shared(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of B rows [prompt | chosen | rejected], right-padded to the longest.

    Returns `input_ids`, `attention_mask` (1 on real tokens), `segments` (PROMPT/CHOSEN/REJECTED, 0 on padding)
    and `position_ids`, all [B, W]; `score_index` [M] (flat index into [B*W] of the hidden state that predicts
    each completion token), `score_target` [M] (that token) and `score_seq` [M] (its sequence in the plain
    layout's order: chosen of pair i is i, rejected is B+i); and `index` [B].
    """
    b = len(pairs)
    width = max((len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs), default=0)
    ids, segs, pos = [], [], []
    src, tgt, seq = [], [], []
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        pad = width - n_p - n_c - n_r
        ids.append(p.prompt_ids + p.chosen_ids + p.rejected_ids + [pad_id] * pad)
        segs.append([PROMPT] * n_p + [CHOSEN] * n_c + [REJECTED] * n_r + [0] * pad)
        pos.append(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)) + [0] * pad)
        row = i * width
        # chosen token j is predicted at position n_p-1+j; rejected token 0 at n_p-1, token j>0 at n_p+n_c+j-1
        src += [row + n_p - 1 + j for j in range(n_c)]
        src += [row + (n_p - 1 if j == 0 else n_p + n_c + j - 1) for j in range(n_r)]
        tgt += p.chosen_ids + p.rejected_ids
        seq += [i] * n_c + [b + i] * n_r
    long = lambda x: torch.tensor(x, dtype=torch.long)
    segments = long(segs).reshape(b, width)
    return {
        "input_ids": long(ids).reshape(b, width),
        "attention_mask": (segments > 0).long(),
        "segments": segments,
        "position_ids": long(pos).reshape(b, width),
        "score_index": long(src),
        "score_target": long(tgt),
        "score_seq": long(seq),
        "index": long([p.index for p in pairs]),
    }


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


MASK_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def fallback_notice(why: str) -> str:
    return f"notice: train.shared_prompt=auto uses the plain layout: {why}"


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers (some or all) see only the last W tokens, else None."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def use_shared_prompt(recipe, model_config=None) -> tuple[bool, str | None]:
    """Whether a run lays its pairs out as shared-prompt rows, and when `auto` says no, why.

    The layout is exact (the same log-probs as [prompt+chosen; prompt+rejected]) when the attention takes a
    custom 4D mask (sdpa, eager) and no sliding window can bind: the mask has no window, so a model whose
    window is shorter than max_length would see more context than in the plain layout. `true` where it is
    not exact is an error naming the key; `auto` then falls back to the plain layout."""
    from .errors import ConfigError

    setting = recipe.train.shared_prompt
    if setting is False:
        return False, None
    problems = []
    impl = recipe.model.attn_implementation
    if impl and impl not in MASK_ATTENTION:
        problems.append(f"model.attn_implementation={impl} takes no custom 4D mask")
    if model_config is None:
        from .model import load_model_config

        model_config = load_model_config(recipe.model)
    window = sliding_window(model_config)
    if window is not None and window < recipe.data.max_length:
        problems.append(f"the model attends through a sliding window of {window} tokens, shorter than "
                        f"data.max_length={recipe.data.max_length}, and the shared layout's mask has no window")
    if not problems:
        return True, None
    if setting is True:
        raise ConfigError(f"train.shared_prompt: {'; '.join(problems)}; set train.shared_prompt=false (or auto)")
    return False, "; ".join(problems)


def check_attention(model, explicit: bool) -> bool:
    """After the model loads: whether its attention takes the shared layout's 4D mask. When it does not, an
    error for `train.shared_prompt: true`, False for auto (the run falls back to the plain layout)."""
    from .errors import ConfigError

    impl = _implementation(model)
    if impl is None or impl in MASK_ATTENTION:
        return True
    if explicit:
        raise ConfigError(f"train.shared_prompt: attention '{impl}' takes no custom 4D mask; use "
                          "model.attn_implementation=sdpa (or eager), or set train.shared_prompt=false")
    return False


def _implementation(model) -> str | None:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(causal_lm.config, "_attn_implementation", None)


def shared_sequence_logps(model, batch: dict, chunk_tokens: int | None = None) -> SequenceLogps:
    """Summed completion log-probs of a `collate_shared` batch: `sums`/`counts` [2B] in the plain layout's
    order (chosen of every pair, then rejected), so the loss code cannot tell the layouts apart."""
    decoder, head, softcap, scale = _unwrap(model)
    segments = batch["segments"]
    mask = attention_mask_4d(segments, _implementation(model), decoder.get_input_embeddings().weight.dtype
                             if decoder.get_input_embeddings().weight.is_floating_point() else torch.float32)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                     use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    kwargs = {} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}
    lp = token_logps(flat[batch["score_index"]], batch["score_target"], head, softcap, scale, **kwargs)
    n = 2 * segments.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, batch["score_seq"], lp)
    counts = torch.bincount(batch["score_seq"], minlength=n).float()
    return SequenceLogps(sums=sums, counts=counts)


# -------------------------------------------------------------------------- what the trainer calls


SHARED_KEYS = ("segments", "position_ids", "score_index", "score_target", "score_seq")


def collate_for(shared: bool):
    """The collate function of the layout a recipe asks for (`train.shared_prompt`)."""
    from .data import collate

    return collate_shared if shared else collate


def forward_inputs(batch: dict) -> dict:
    """The keyword arguments of `PolicyLogps.forward` for a batch of either layout."""
    if "segments" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "shared": {k: batch[k] for k in SHARED_KEYS}}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "loss_mask": batch["loss_mask"]}
