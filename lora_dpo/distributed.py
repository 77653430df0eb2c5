"""Several processes, one run: the same recipe under `accelerate launch` (DDP, FSDP, DeepSpeed).

Every process holds the base model and the adapter. The training data is one stream of pair positions,
the epochs' seeded permutations end to end, a pure function of the recipe. Optimizer step s takes pairs
[s*P, (s+1)*P) of the stream, P = batch_size x grad_accum x processes (the global batch); the step's pairs
are cut into grad_accum micro-batches of batch_size x processes pairs, and process r takes the r-th
batch_size slice of each. So every step averages exactly P pairs, whatever the process count, and any
batch_size x processes that is equal trains on the same pairs in the same steps (one process with batch 2B
equals two processes with batch B). accelerate averages the gradients; the per-pair metric sums, the skip
decision and the stop request are reduced here so that every process agrees on them.

Reference log-probs and evaluations are split into global batches of eval.batch_size x processes and
gathered. A process left without pairs in a batch (the last one) runs a "ghost" forward on one pair and
discards it: under FSDP and DeepSpeed ZeRO-3 every forward is collective, so all processes must run the
same number of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import DistributedType

from .checkpoint import STATE_FILE
from .errors import ConfigError
from .metrics import Stats


def wants_cpu() -> bool:
    """True on a machine without a GPU: accelerate then runs several processes on the CPU with gloo
    (it only does so when asked for the CPU, even under torchrun)."""
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... in one call
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())


def is_main_process() -> bool:
    """Whether this process writes the run directory and the terminal; usable before accelerate starts."""
    from accelerate import PartialState

    if PartialState._shared_state:
        return PartialState().is_main_process
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0"))) == 0


def is_sharded(accelerator) -> bool:
    """True when the base model's weights are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float) -> None:
    """DeepSpeed reads the micro-batch size and the clipping norm from its own config; fill them from the
    recipe (accelerate could only infer the batch size from a DataLoader, which this loop does not use)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    if cfg.get("gradient_clipping") in (None, "auto"):
        cfg["gradient_clipping"] = max_grad_norm


# ---------------------------------------------------------------------------------------------- the data


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
        """The epoch's order of positions (a subclass may regroup it: grouping.py)."""
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


# ---------------------------------------------------------------------------------------------- the model


class PolicyLogps(torch.nn.Module):
    """The module accelerate wraps (DDP, FSDP, DeepSpeed): its forward is the whole differentiable
    computation, the completion log-probs of a batch, so the engine's hooks see every parameter it uses.
    (Calling the peft model's decoder directly, as `sequence_logps` does, would bypass a DDP wrapper.)"""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy  # the peft model; with its adapter disabled it is the reference
        self.config = policy.config  # DeepSpeed's "auto" sizes read model.config.hidden_size
        self._no_split_modules = getattr(policy, "_no_split_modules", None)  # FSDP wraps these layers

    def forward(self, input_ids, attention_mask, loss_mask=None, shared=None):
        """input_ids, attention_mask, loss_mask: [N, T] -> (sums [N] float32, counts [N] float32).
        `shared`: the extra tensors of a shared-prompt batch (shared_prompt.py), whose rows are pairs."""
        from .logps import sequence_logps

        if shared is not None:
            from .shared_prompt import shared_sequence_logps

            out = shared_sequence_logps(self.policy, {"input_ids": input_ids, **shared})
            return out.sums, out.counts
        out = sequence_logps(self.policy, input_ids, attention_mask, loss_mask)
        return out.sums, out.counts


def policy_of(model):
    """The peft model inside whatever wrapper `accelerator.prepare` put around a `PolicyLogps`."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model).policy


# --------------------------------------------------------------------------------------------- reductions


def reduce_sum(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum over processes, in float64 (sums of losses and log-probs stay exact enough)."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def reduce_stats(accelerator, stats: Stats) -> Stats:
    """The metric sums of all processes, on every process."""
    if accelerator.num_processes == 1:
        return stats
    return type(stats).from_vector(reduce_sum(accelerator, stats.vector()))


def max_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).max())


# ------------------------------------------------------------------------------ steps, checkpoints, resume


def clip_params(accelerator, model, params):
    """What to pass to `accelerator.clip_grad_norm_`: the adapter's parameters, or under FSDP the module's."""
    # FSDP clips through the wrapped module, which accelerate recognises by its full parameter list
    return model.parameters() if accelerator.distributed_type == DistributedType.FSDP else params


def gathered_adapter(accelerator, model) -> dict:
    """The whole adapter of a model sharded across processes (FSDP, ZeRO-3), gathered: every process must
    call this. Keys as the peft model names them."""
    full = accelerator.get_state_dict(model)
    prefix = "policy."
    return {k[len(prefix):]: v for k, v in (full or {}).items() if "lora_" in k}


def check_same_global_batch(checkpoint: Path, t, world: int) -> None:
    """A checkpoint resumes with any number of processes that keeps its global batch (pairs per optimizer
    step): the data stream, the step count and the schedule are then those of the interrupted run."""
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    before = saved.get("pairs_per_step", 0)
    now = t.batch_size * t.grad_accum * world
    if not before or before == now:
        return
    hints = []
    if before % (t.grad_accum * world) == 0:
        hints.append(f"train.batch_size={before // (t.grad_accum * world)}")
    if before % (t.batch_size * world) == 0:
        hints.append(f"train.grad_accum={before // (t.batch_size * world)}")
    hint = f"; with {world} process(es) set {' or '.join(hints)}" if hints else ""
    raise ConfigError(
        f"train.batch_size: {checkpoint} was written with a global batch of {before} pairs per step "
        f"({saved.get('processes', 1)} process(es)); this run would take {now} (train.batch_size {t.batch_size} x "
        f"train.grad_accum {t.grad_accum} x {world} process(es)). A resumed run must keep the global batch{hint}"
    )
