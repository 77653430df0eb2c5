"""The module accelerate wraps (DDP, FSDP, DeepSpeed): the policy's completion log-probs as one forward.

Its forward is the whole differentiable computation, so the engine's hooks see every parameter it uses.
(Calling the peft model's decoder directly, as core/logps does, would bypass a DDP wrapper.) Methods run every
forward through it, and reach the peft model inside with `policy_of` (for the reference: model/adapters.py).
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from ..core.logps import completion_logps


class PolicyLogps(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy  # the peft model; with its adapter disabled it is the reference
        self.config = policy.config  # DeepSpeed's "auto" sizes read model.config.hidden_size
        self._no_split_modules = getattr(policy, "_no_split_modules", None)  # FSDP wraps these layers

    def forward(self, input_ids, attention_mask, score_index, score_target, score_seq, segments=None,
                position_ids=None):
        """A batch of either layout (data/batches.forward_inputs) -> (sums, counts), [N] float32 each: the
        summed log-probs of each sequence's completion and its number of completion tokens, in the plain
        layout's order (for pairs: chosen of every pair, then rejected)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "score_index": score_index,
                 "score_target": score_target, "score_seq": score_seq}
        if segments is not None:
            batch.update(segments=segments, position_ids=position_ids)
        rows = input_ids.shape[0]
        out = completion_logps(self.policy, batch, 2 * rows if segments is not None else rows)
        return out.sums, out.counts


def policy_of(model):
    """The peft model inside whatever wrapper `accelerator.prepare` put around a `PolicyLogps`."""
    return extract_model_from_parallel(model).policy
