"""Length-grouped data order: fewer padding tokens, same global batches.

A batch is padded to its longest row, so a long pair next to short ones makes them pay for its length. Here
each epoch's seeded permutation (distributed.epoch_order) is cut into windows of `window_steps` optimizer
steps; inside a window the pairs are sorted by length and cut into steps of exactly the global batch
(batch_size x grad_accum x processes pairs), and the steps are shuffled (seeded). The stream contract of
distributed.py is untouched: step s still takes stream items [s*P, (s+1)*P), every epoch is a permutation of
all pairs, and the order depends only on (seed, epoch, lengths, P), so any split of P into batch_size x
processes trains on the same pairs in the same steps, and a resume continues the same stream. Inside a step
the pairs run longest first, so each micro-batch and each process's slice hold pairs of similar length.

What changes: which pairs share a step (similar lengths do), as with `group_by_length` in transformers'
Trainer. It is an option (`train.group_by_length`), off by default.
"""

from __future__ import annotations

import random

from .distributed import PairStream, epoch_order

WINDOW_STEPS = 50  # steps per sorting window: larger groups tighter, smaller keeps more of the shuffle


def row_length(pair, shared_prompt: bool) -> int:
    """The width a pair's rows take in a batch: prompt + the longer reply (plain), or prompt + both (shared)."""
    if shared_prompt:
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


class LengthGroupedStream(PairStream):
    """A PairStream whose epochs are length-grouped in steps of `pairs_per_step` (see the module docstring)."""

    def __init__(self, lengths: list[int], seed: int, pairs_per_step: int, window_steps: int = WINDOW_STEPS):
        super().__init__(len(lengths), seed)
        self.lengths, self.pairs_per_step, self.window = list(lengths), pairs_per_step, pairs_per_step * window_steps

    def order(self, epoch: int) -> list[int]:
        base = epoch_order(self.n, self.seed, epoch)
        rng = random.Random(self.seed * 1_000_003 + epoch)
        out: list[int] = []
        for start in range(0, self.n, self.window):
            window = sorted(base[start : start + self.window], key=lambda i: -self.lengths[i])  # stable
            steps = [window[k : k + self.pairs_per_step] for k in range(0, len(window), self.pairs_per_step)]
            rng.shuffle(steps)
            out += [i for step in steps for i in step]
        return out


def training_stream(pairs, seed: int, pairs_per_step: int, group_by_length: bool, shared_prompt: bool) -> PairStream:
    """The trainer's data stream: plain seeded epochs, or length-grouped ones."""
    if not group_by_length:
        return PairStream(len(pairs), seed)
    return LengthGroupedStream([row_length(p, shared_prompt) for p in pairs], seed, pairs_per_step)


def in_length_order(compute, pairs, shared_prompt: bool):
    """`compute(pairs)` -> [n, ...] run on the pairs sorted by length (batches of similar lengths: less padding),
    rows returned in the order of `pairs`. For passes whose rows do not interact (the reference pass): the
    values are those of any other order, within float rounding."""
    import torch

    order = sorted(range(len(pairs)), key=lambda i: row_length(pairs[i], shared_prompt))
    table = compute([pairs[i] for i in order])
    out = torch.empty_like(table)
    out[torch.tensor(order, dtype=torch.long)] = table
    return out
