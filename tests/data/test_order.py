"""Length-grouped order: every step still takes exactly the global batch, the same for any process split, every
epoch is a permutation, the order resumes; and batches carry less padding than the plain shuffle."""

import random

from lora_dpo.data.order import PairStream, step_micro_batches
from lora_dpo.data.order import LengthGroupedStream, row_length

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(10, 200) for _ in range(103)]  # 103: steps straddle the epoch boundary


def steps_of(stream, pairs_per_step, batch_size, grad_accum, world, n_steps):
    """Per step: each process's micro-batches, flattened in (micro-batch, rank) order."""
    out = []
    for s in range(n_steps):
        per_rank = [step_micro_batches(stream, s * pairs_per_step, batch_size, grad_accum, r, world)
                    for r in range(world)]
        out.append([i for k in range(grad_accum) for r in range(world) for i in per_rank[r][k]])
    return out


def test_each_step_takes_exactly_the_global_batch_for_any_process_split():
    p = 8
    one = steps_of(LengthGroupedStream(LENGTHS, 1, p), p, 8, 1, 1, 40)
    two = steps_of(LengthGroupedStream(LENGTHS, 1, p), p, 4, 1, 2, 40)
    four_accum = steps_of(LengthGroupedStream(LENGTHS, 1, p), p, 1, 2, 4, 40)
    assert one == two == four_accum
    assert all(len(step) == p for step in one)


def test_every_epoch_is_a_permutation_and_the_order_is_a_pure_function():
    a, b = LengthGroupedStream(LENGTHS, 3, 4), LengthGroupedStream(LENGTHS, 3, 4)
    for epoch in range(3):
        assert sorted(a.order(epoch)) == list(range(len(LENGTHS)))
    assert a.take(200, 50) == b.take(200, 50)  # a resumed stream (fresh object) continues identically
    assert a.order(0) != a.order(1)


def test_grouped_steps_carry_less_padding_than_the_plain_shuffle():
    p = 4

    def padding(stream):
        total = 0
        for s in range(len(LENGTHS) // p):
            step = stream.take(s * p, p)
            total += sum(max(LENGTHS[i] for i in step) - LENGTHS[i] for i in step)
        return total

    assert padding(LengthGroupedStream(LENGTHS, 1, p)) < 0.2 * padding(PairStream(len(LENGTHS), 1))


def test_row_length_is_the_width_a_pair_takes_in_its_layout():
    from lora_dpo.data.pairs import EncodedPair

    pair = EncodedPair(index=0, prompt="", prompt_ids=[1] * 5, chosen_ids=[2] * 3, rejected_ids=[3] * 7)
    assert row_length(pair, shared_prompt=False) == 12 and row_length(pair, shared_prompt=True) == 15


def test_in_length_order_computes_on_sorted_pairs_and_returns_rows_in_the_original_order():
    import torch

    from lora_dpo.data.pairs import EncodedPair
    from lora_dpo.data.order import in_length_order

    pairs = [EncodedPair(index=i, prompt="", prompt_ids=[1] * n, chosen_ids=[2], rejected_ids=[3])
             for i, n in enumerate([5, 2, 9, 1])]
    seen = []

    def compute(ps):
        seen.extend(len(p.prompt_ids) for p in ps)
        return torch.tensor([[float(p.index), -float(p.index)] for p in ps])

    out = in_length_order(compute, pairs, shared_prompt=False)
    assert seen == [1, 2, 5, 9]
    assert out[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
