"""Batches: encoded examples -> padded tensors, one collate function per layout.

Every batch says which positions are scored (`score_index`, `score_target`, `score_seq`; core/logps.py), worked
out here on the CPU from the token lists, so the forward needs no data-dependent indexing on the device.

    plain pairs   `collate`: 2B rows, prompt+chosen of every pair, then prompt+rejected
    shared pairs  `collate_shared`: B rows [prompt | chosen | rejected], a prompt encoded once (core/logps.py)
    completions   `collate_completions`: N rows prompt+completion (SFT, KTO, sampled completions)

A completion token at position t of a row is predicted by the hidden state at t - 1; its sequence number is
its row in the plain layout (chosen of pair i is i, its rejected B + i).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.logps import CHOSEN, PROMPT, REJECTED, SHARED_KEYS


def _long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of (prompt, reply) with their masks and scored positions."""
    width = max((len(prompt) + len(reply) for prompt, reply in rows), default=0)
    ids, attention, loss, src, tgt, seq = [], [], [], [], [], []
    for r, (prompt, reply) in enumerate(rows):
        n_p, n_c = len(prompt), len(reply)
        pad = width - n_p - n_c
        row = prompt + reply + [pad_id] * pad
        ids.append(row)
        attention.append([1] * (n_p + n_c) + [0] * pad)
        loss.append([False] * n_p + [True] * n_c + [False] * pad)
        positions = range(max(n_p - 1, 0), n_p + n_c - 1)  # each predicts the completion token after it
        src += [r * width + t for t in positions]
        tgt += [row[t + 1] for t in positions]
        seq += [r] * len(positions)
    n = len(rows)
    return {
        "input_ids": _long(ids).reshape(n, width),
        "attention_mask": _long(attention).reshape(n, width),
        "loss_mask": torch.tensor(loss, dtype=torch.bool).reshape(n, width),
        "score_index": _long(src),
        "score_target": _long(tgt),
        "score_seq": _long(seq),
    }


def collate(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad B pairs into one batch of 2B sequences for a single concatenated forward.

    Returns `input_ids` [2B, T] long (rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded
    with `pad_id`, T = longest sequence), `attention_mask` [2B, T] long, `loss_mask` [2B, T] bool (True exactly
    at completion tokens, EOS included), the scored positions, and `index` [B] long.
    """
    halves = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return {**_rows(halves, pad_id), "index": _long([p.index for p in pairs])}


def collate_completions(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """N examples -> `input_ids` [N, T], `attention_mask` [N, T], `loss_mask` [N, T] (True at completion
    tokens), the scored positions, `desirable` [N] bool; right-padded with `pad_id`."""
    batch = _rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    return {**batch, "desirable": torch.tensor([e.desirable for e in examples], dtype=torch.bool)}


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
    segments = _long(segs).reshape(b, width)
    return {
        "input_ids": _long(ids).reshape(b, width),
        "attention_mask": (segments > 0).long(),
        "segments": segments,
        "position_ids": _long(pos).reshape(b, width),
        "score_index": _long(src),
        "score_target": _long(tgt),
        "score_seq": _long(seq),
        "index": _long([p.index for p in pairs]),
    }


def collate_for(shared: bool) -> Callable[..., dict[str, torch.Tensor]]:
    """The collate function of pairs in a layout: shared-prompt rows, or the plain two rows per pair."""
    return collate_shared if shared else collate


FORWARD_KEYS = ("input_ids", "attention_mask", "score_index", "score_target", "score_seq")


def forward_inputs(batch: dict) -> dict:
    """What the log-prob forward reads of a batch of either layout (core/logps.completion_logps)."""
    keys = FORWARD_KEYS + (SHARED_KEYS if "segments" in batch else ())
    return {k: batch[k] for k in keys}


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. To a GPU they go through pinned memory without blocking: a copy from
    pageable memory would make the host wait for the GPU's queue (a sync per micro-batch)."""
    return {k: move(v, device) for k, v in batch.items()}


def move(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` (see `to_device`)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
