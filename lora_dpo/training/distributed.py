"""Several processes, one run: the same recipe under `accelerate launch` (DDP, FSDP, DeepSpeed).

Every process holds the base model and the adapter (or a shard of them). Each takes its slice of every step's
global batch (data/order.py); accelerate averages the gradients; the metric sums, the skip decision and the stop
request are reduced here so that every process agrees on them, in one all-reduce per step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, load_fsdp_optimizer, save_fsdp_optimizer
from tqdm.auto import tqdm

from ..core.stats import Stats


def wants_cpu() -> bool:
    """True on a machine without a GPU: accelerate then runs several processes on the CPU with gloo
    (it only does so when asked for the CPU, even under torchrun)."""
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... in one call
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())


def is_main_process() -> bool:
    """Whether this process writes the run directory and the terminal; usable before accelerate starts."""
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


# --------------------------------------------------------------------------------------------- reductions


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes of a float64 vector, on the device (an all-reduce; no host sync)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum")


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


def save_sharded_optimizer(accelerator, model, optimizer, folder: Path) -> None:
    """Every process: its part of a sharded optimizer state into `folder` (a checkpoint being written), through the
    engine's own functions: accelerate's save_fsdp_optimizer under FSDP (one gathered file under FULL_STATE_DICT,
    a torch.distributed.checkpoint folder under SHARDED_STATE_DICT), the DeepSpeed engine's save_checkpoint under
    ZeRO-3 (each process's optimizer partition; the frozen 4-bit base left out)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
    else:
        model.save_checkpoint(str(folder), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_sharded_optimizer(accelerator, model, optimizer, folder: Path) -> None:
    """Every process, once the engine has wrapped model and optimizer: the state `save_sharded_optimizer` wrote."""
    if accelerator.distributed_type == DistributedType.FSDP:
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
    else:  # the adapter's weights are already the checkpoint's (setup loaded them before the engine wrapped them)
        model.load_checkpoint(str(folder), tag="state", load_module_strict=False, load_optimizer_states=True,
                              load_lr_scheduler_states=False)


def gathered_adapter(accelerator, model) -> dict:
    """The whole adapter of a model sharded across processes (FSDP, ZeRO-3), gathered: every process must
    call this. Keys as the peft model names them."""
    full = accelerator.get_state_dict(model)
    prefix = "policy."
    return {k[len(prefix):]: v for k, v in (full or {}).items() if "lora_" in k}


def log(msg: str) -> None:
    """A line for the user, on stderr, from the main process only (above a progress bar, if one is drawn)."""
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)
