"""The reference pass: log pi_ref of every example, once per round, before the steps that need it.

The reference never changes during a round of offline DPO, so its log-probs are computed in one pass (in length
order, for less padding) and cached on disk (refcache.py); a step then reads its examples' rows instead of
running the reference model again. The pass is split across processes and summed back together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batches import forward_inputs, to_device
from ..data.order import in_length_order, shards
from ..methods import Data, Method
from ..model.adapters import reference_model
from ..model.wrapped import policy_of
from ..progress import progress
from .refcache import ReferenceCache


@dataclass
class ReferenceTables:
    """[examples, width] summed log pi_ref (width 2 for pairs: chosen, rejected; a [examples] vector for single
    completions), for the round's training examples and the held-out ones; None where not precomputed."""

    train: Optional[torch.Tensor] = None
    eval: Optional[torch.Tensor] = None


def compute_table(method: Method, model, items: list, accelerator, what: str = "examples") -> torch.Tensor:
    """[len(items), width] summed log pi_ref of each item's sequences, computed with the reference model in eval
    batches split across processes and summed back together. `what` names the items on the progress bar."""
    width = method.reference_width
    out = torch.zeros(len(items), width)
    model.eval()
    bs = method.recipe.eval.batch_size
    batches = list(shards(len(items), bs, accelerator.process_index, accelerator.num_processes))
    bar = progress(batches, desc=f"reference pass ({len(items)} {what})", unit="batch",
                   disable=not accelerator.is_main_process)
    for idx, ghost in bar:
        b = forward_inputs(to_device(method.collate([items[i] for i in idx]), accelerator.device))
        with reference_model(policy_of(model)):
            sums, _ = model(**b)
        if not ghost:
            out[idx[0] : idx[-1] + 1] = sums.view(width, -1).T.cpu()
    if accelerator.num_processes > 1:
        out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
    return out


def reference_tables(method: Method, model, data: Data, accelerator, tokenizer,
                     reference_adapter: Optional[str]) -> ReferenceTables:
    """The round's reference tables. Pairs come from the on-disk cache when their fingerprint matches (the
    reference adapter's digest is part of it), else from one pass in length order; single completions (KTO) are
    computed in order. The training table is skipped when the method computes its reference per step
    (online DPO, or train.precompute_reference: false)."""
    if not method.needs_reference:
        return ReferenceTables()
    recipe = method.recipe
    cache = None
    if method.unit == "pair":
        cache = ReferenceCache.for_run(recipe, tokenizer, policy_of(model), accelerator.device, accelerator,
                                       reference_adapter=reference_adapter)

    def table(items: list, split: str) -> torch.Tensor:
        what = f"{split} {method.unit}s"
        if cache is None:
            return compute_table(method, model, items, accelerator, what)[:, 0]
        compute = lambda ps: compute_table(method, model, ps, accelerator, what)  # noqa: E731
        return cache.table(items, lambda: in_length_order(compute, items, method.layout.shared))

    precompute = recipe.train.precompute_reference and method.precomputes_reference
    return ReferenceTables(train=table(data.train, "training") if precompute else None,
                           eval=table(data.eval, "held-out") if data.eval else None)
