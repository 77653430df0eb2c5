"""The order examples are trained in: one seeded stream of positions, each optimizer step its next global batch,
each process its slice; optionally length-grouped; and the shards of a pass that every process takes part in.

The training data is one stream of pair positions, the epochs' seeded permutations end to end, a pure function
of the recipe. Optimizer step s takes pairs [s*P, (s+1)*P) of the stream, P = batch_size x grad_accum x
processes (the global batch); the step's pairs are cut into grad_accum micro-batches of batch_size x processes
pairs, and process r takes the r-th batch_size slice of each. So every step averages exactly P pairs, whatever
the process count, and any batch_size x processes that is equal trains on the same pairs in the same steps (one
process with batch 2B equals two processes with batch B).

Reference log-probs and evaluations are split into global batches of eval.batch_size x processes (`shards`). A
process left without items in a batch (the last one) runs a "ghost" forward on one item and discards it: under
FSDP and DeepSpeed ZeRO-3 every forward is collective, so all processes must run the same number of them.

Length-grouped data order: fewer padding tokens, same global batches.

A batch is padded to its longest row, so a long pair next to short ones makes them pay for its length. Here
each epoch's seeded permutation (`epoch_order`) is cut into windows of `window_steps` optimizer
steps; inside a window the pairs are sorted by length and cut into steps of exactly the global batch
(batch_size x grad_accum x processes pairs), and the steps are shuffled (seeded). The stream contract above is
untouched: step s still takes stream items [s*P, (s+1)*P), every epoch is a permutation of
all pairs, and the order depends only on (seed, epoch, lengths, P), so any split of P into batch_size x
processes trains on the same pairs in the same steps, and a resume continues the same stream. Inside a step
the pairs run longest first, so each micro-batch and each process's slice hold pairs of similar length.

What changes: which pairs share a step (similar lengths do), as with `group_by_length` in transformers'
Trainer. It is an option (`train.group_by_length`), off by default.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of positions 0..n-1, seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


class PairStream:
    """The training pairs as one endless stream of positions: epoch 0's permutation, then epoch 1's, ..."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, []

    def take(self, start: int, count: int) -> list[int]:
        """Positions of stream items [start, start + count)."""
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self.order(epoch)
            chunk = self._order[offset : offset + count]
            out += chunk
            start, count = start + len(chunk), count - len(chunk)
        return out

    def order(self, epoch: int) -> list[int]:
        """The epoch's order of positions (a subclass may regroup it: LengthGroupedStream)."""
        return epoch_order(self.n, self.seed, epoch)


def step_micro_batches(stream: PairStream, start: int, batch_size: int, grad_accum: int, rank: int, world: int):
    """This process's grad_accum micro-batches (lists of batch_size positions) of the optimizer step whose
    pairs begin at stream item `start`."""
    per_micro = batch_size * world
    return [stream.take(start + k * per_micro + rank * batch_size, batch_size) for k in range(grad_accum)]


def shards(n: int, batch_size: int, rank: int, world: int) -> Iterator[tuple[list[int], bool]]:
    """(indices, ghost) for this process's part of each global batch of `batch_size x world` items of
    0..n-1, contiguous slices of batch_size. Every process gets the same number of batches; where a process
    has nothing left (the last batch), it gets the batch's first index with ghost=True: run it, ignore it."""
    for start in range(0, n, batch_size * world):
        lo = min(start + rank * batch_size, n)
        hi = min(lo + batch_size, n)
        yield (list(range(lo, hi)), False) if hi > lo else ([start], True)


# ------------------------------------------------------------------------------------ length grouping

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
    order = sorted(range(len(pairs)), key=lambda i: row_length(pairs[i], shared_prompt))
    table = compute([pairs[i] for i in order])
    out = torch.empty_like(table)
    out[torch.tensor(order, dtype=torch.long)] = table
    return out


def pair_widths(pairs) -> list[tuple[int, int, int]]:
    """(plain width, shared width, completion tokens) of each pair, for the memory model (memory/plan.Setting)."""
    return [(row_length(p, False), row_length(p, True), len(p.chosen_ids) + len(p.rejected_ids)) for p in pairs]
