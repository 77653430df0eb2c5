"""The setup phase of a run: everything that happens before the first reference pass, in the order a user
needs it. The recipe and the data are checked before any model loads (only the tokenizer is needed to
tokenise); then the device, precision and trackers; the model, its layout and its memory levers; the schedule;
and a resumed run's state or a fresh run's record.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from transformers import get_scheduler

from ..config import Recipe, flat, load_scorer, save_recipe, to_dict
from ..core.logps import MASK_ATTENTION, attention_implementation
from ..core.losses import LOSSES
from ..data.fingerprint import data_fingerprint
from ..data.order import pair_widths
from ..errors import ConfigError, DataError
from ..memory.allocator import keep_freed_memory
from ..methods import Data, Method, method_class
from ..methods.judges import check_judge_spec
from ..model.adapters import (POLICY, REFERENCE, adapter_fingerprint, load_adapter_weights, load_policy,
                              resolve_adapter, trainable_parameters)
from ..model.checkpointing import apply_auto
from ..model.layout import Layout, decide_layout
from ..model.load import base_origin, load_model_config, load_tokenizer
from ..model.offload import embeddings_on_cpu
from ..model.tiling import tile_mlps
from ..model.wrapped import PolicyLogps, policy_of
from ..progress import phase, record_to
from ..run.checkpoint import SHARDED_OPTIMIZER, TrainerState, find_resume_checkpoint, load_checkpoint
from ..run.rundir import ADAPTER_DIR, STATE_FILE, RunDir, run_info
from .distributed import configure_deepspeed, is_sharded, load_sharded_optimizer, log, wants_cpu
from .resume import check_same_global_batch, check_same_recipe
from .trackers import check_trackers, init_kwargs, project_name


@dataclass
class Setup:
    """What the setup phase built, and the loop's position (round, step) after a resume."""

    recipe: Recipe
    run: RunDir
    accelerator: Accelerator
    tokenizer: object
    method: Method
    data: Data  # the first round's examples, the held-out ones and the data report
    rounds: list[list]  # each round's training examples
    ends: list[int]  # the step that ends each round
    policy: object  # the peft model
    model: torch.nn.Module  # the PolicyLogps around it, as accelerate prepared it
    params: list
    optimizer: object
    scheduler: object
    state: TrainerState
    resume_from: Optional[Path]
    round_idx: int
    reference_adapter: Optional[str]  # digest of the reference adapter (None: the bare base), the cache's key

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return is_sharded(self.accelerator)

    @property
    def pairs_per_step(self) -> int:
        return self.recipe.train.pairs_per_step(self.world)  # the global batch

    @property
    def total_steps(self) -> int:
        return self.ends[-1]


def mixed_precision(recipe: Recipe, device_type: str) -> str:
    if recipe.train.mixed_precision != "auto":
        return recipe.train.mixed_precision
    if device_type != "cuda":
        return "no"  # CPU autocast to bf16 is slower than fp32 on most CPUs and changes the numbers
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_optimizer(recipe: Recipe, params):
    t = recipe.train
    if t.optimizer == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise ConfigError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on this machine")
        import bitsandbytes as bnb  # noqa: PLC0415 - optional heavy dependency, for this optimizer only

        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def round_steps(recipe: Recipe, sizes: list[int], pairs_per_step: int) -> list[int]:
    """Optimizer steps of each round: train.max_steps, or train.epochs over the round's data."""
    t = recipe.train
    return [t.max_steps or max(1, math.ceil(t.epochs * n / pairs_per_step)) for n in sizes]


def check_before_loading(recipe: Recipe, run: RunDir, world: int, main: bool = True) -> Optional[Path]:
    """What can be refused before anything loads: the run directory (fresh, or a run to resume with the same
    recipe and global batch), the scorer, the start adapter, the judge. Returns the checkpoint to resume from."""
    resume_from = None
    run.check_writable()
    if run.path.is_dir() and main:
        run.hold()  # a run training there now: refused before anything loads
    if recipe.resume:
        resume_from = find_resume_checkpoint(run, recipe.resume)
        if resume_from is None and run.finished() and not recipe.overwrite:
            raise ConfigError(f"resume: {run.path} holds a finished run and no complete checkpoint to continue from, "
                              "so there is nothing to resume; start it again with overwrite=true (which replaces "
                              "its adapter), or choose another output_dir")
        if resume_from is None:
            log(f"notice: no complete checkpoint in {run.checkpoints}; starting from scratch")
    if resume_from is None:
        run.check_fresh(recipe.overwrite or bool(recipe.resume))
    else:
        check_same_recipe(recipe, run.config)
        check_same_global_batch(resume_from, recipe.train, world)
    check_trackers(recipe)  # a tracker that is not installed: before anything loads
    if recipe.eval.scorer:
        load_scorer(recipe.eval.scorer)  # a bad scorer is a recipe error, reported before the model loads
    if recipe.model.adapter:
        resolve_adapter(recipe.model.adapter)  # and so is a missing start adapter
    if recipe.online.enabled:
        check_judge_spec(recipe.online.judge)  # and a judge that cannot be imported
    return resume_from


def make_accelerator(recipe: Recipe, run: RunDir, device: torch.device) -> Accelerator:
    t = recipe.train
    return Accelerator(
        cpu=wants_cpu(),
        mixed_precision=mixed_precision(recipe, device.type),
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not steps x processes
        log_with=list(t.report_to) or None,
        project_dir=str(run.path),
        # the buffers (rotary frequencies) are constants: broadcasting them before every forward is wasted
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def load_model(recipe: Recipe, accelerator: Accelerator, tokenizer, layout: Layout) -> tuple[object, Method]:
    """The policy on its device with its memory levers, and the method in its layout (decided before the model
    loaded, from its configuration; decided again only when transformers chose an attention that takes no 4D
    mask, which the configuration could not tell)."""
    t = recipe.train
    sharded = is_sharded(accelerator)
    _notice_engine_not_used(accelerator)
    configure_deepspeed(accelerator, t.batch_size, t.max_grad_norm)
    if t.embeddings_on_cpu and sharded:
        raise ConfigError("train.embeddings_on_cpu: FSDP and DeepSpeed ZeRO-3 place the weights themselves (each process "
                          "holds a shard of the table already); set it to false")
    if t.optimizer == "paged_adamw_8bit":
        make_optimizer(recipe, [])  # fail now, not after the model has loaded
    policy = load_policy(recipe.model, recipe.lora, accelerator.device, sharded, reference_adapter=t.rounds > 1)
    if t.mlp_chunks > 1:
        tile_mlps(policy, t.mlp_chunks)
    if layout.shared and attention_implementation(policy) not in MASK_ATTENTION:
        layout = decide_layout(recipe, policy.config, attention_implementation(policy))
        if layout.notice():
            log(layout.notice())
    if recipe.model.adapter:
        log(f"policy and reference start from the adapter {resolve_adapter(recipe.model.adapter)} (two adapters on "
            "one base; the lora.* keys come from it)")
    return policy, method_class(recipe)(recipe, tokenizer, layout)


def record_or_restore(recipe: Recipe, run: RunDir, accelerator: Accelerator, policy, optimizer, scheduler,
                      resume_from: Optional[Path], data: Data, total_steps: int) -> TrainerState:
    """A resumed run restores its state before the engine wraps the model (under FSDP the adapter is then
    sharded from the restored weights); a fresh run writes its record. Every process has checked the run
    directory before the main one writes to it."""
    world, sharded = accelerator.num_processes, is_sharded(accelerator)
    if accelerator.is_main_process:
        run.hold()  # before anything in it is read or replaced: a second run into it is refused (RunDir.hold)
    accelerator.wait_for_everyone()
    if resume_from is not None:
        _check_same_data(recipe, run, data)
        load_adapter_weights(policy, resume_from / ADAPTER_DIR, POLICY, holds=f"the adapter of {resume_from}")
        state = load_checkpoint(resume_from, None if sharded else optimizer, scheduler, accelerator.scaler,
                                accelerator.process_index, world)
        if accelerator.is_main_process:
            run.truncate_metrics(state.step)
            run.touch_run_info(total_steps=total_steps)  # a live reader (the app) sees the run resume
        log(f"resuming from {resume_from} (step {state.step} of {total_steps}; "
            f"written by {state.processes} process(es), resumed by {world})")
    else:
        state = TrainerState()
        if accelerator.is_main_process:
            run.path.mkdir(parents=True, exist_ok=True)
            run.clear()
            save_recipe(recipe, run.config)
            run.write_json(run.data_report, data.report.to_dict())
            name = recipe.model.name
            fingerprints = {"train": data_fingerprint(data.train, name), "eval": data_fingerprint(data.eval, name)}
            run.write_json(run.run_info, {**run_info(accelerator.device, fingerprints), "processes": world,
                                          "total_steps": total_steps, "base_origin": base_origin(recipe.model)})
    state.pairs_per_step, state.processes = recipe.train.pairs_per_step(world), world
    return state


def _check_same_data(recipe: Recipe, run: RunDir, data: Data) -> None:
    """A resumed run trains on the rows the run started with: its data's fingerprints must be run_info.json's."""
    saved = ((run.read_json(run.run_info) or {}) if run.run_info.is_file() else {}).get("data") or {}
    name = recipe.model.name
    for split, rows, source in (("train", data.train, recipe.data.train), ("eval", data.eval, recipe.data.eval or
                                                                          recipe.data.train)):
        if saved.get(split) and data_fingerprint(rows, name) != saved[split]:
            raise DataError(f"resume: the {split} data ({source}) is not what {run.path} trained on (its rows, or how "
                            "they are tokenised, changed since); a resumed run must train on the same rows: restore "
                            "the data, or start a new output_dir")


def setup(recipe: Recipe) -> Setup:
    """Phase 1 of a run: checks, data, device, model, schedule, and the state to start from."""
    t, run = recipe.train, RunDir(recipe.output_dir)
    procs = PartialState(cpu=wants_cpu())  # one process, or one of several under `accelerate launch`
    if procs.device.type == "cpu":
        keep_freed_memory()  # memory/allocator.py: 10-15% faster steps on the CPU
    resume_from = check_before_loading(recipe, run, procs.num_processes, procs.is_main_process)
    if procs.is_main_process:  # the run's phases from here on, in its progress.json (a resumed run's after its own)
        record_to(run.progress, keep=resume_from is not None)
    set_seed(t.seed)

    # Data, checked before any model loads. One process per machine fills the caches (the toy world, datasets)
    # before the others read them.
    with procs.local_main_process_first():
        tokenizer = load_tokenizer(recipe.model)
        cls = method_class(recipe)
        data = cls.load(recipe, tokenizer)
        rounds = [data.train] + [cls.load_train(recipe, tokenizer, src) for src in recipe.data.rounds]
        # how pairs are laid out (model/layout.py), from the model's configuration: a `true` that cannot hold is
        # refused before the model loads
        layout = decide_layout(recipe, load_model_config(recipe.model))
    log(data.report.summary())
    if layout.notice():
        log(layout.notice())
    rounds += [data.train] * (t.rounds - len(rounds))  # rounds without data of their own reuse data.train

    accelerator = make_accelerator(recipe, run, procs.device)  # (the process's device, known before precision)
    with phase("loading the model"):
        policy, method = load_model(recipe, accelerator, tokenizer, layout)

    # Schedule: optimizer steps from epochs (or max_steps) in each round; warmup then decay over them all. Each
    # step averages exactly pairs_per_step examples of the round's data stream (data/order.py), so the step count
    # is the same for any number of processes with the same global batch.
    steps = round_steps(recipe, [len(r) for r in rounds], t.pairs_per_step(accelerator.num_processes))
    ends = [sum(steps[: k + 1]) for k in range(len(steps))]
    params = trainable_parameters(policy)
    optimizer = make_optimizer(recipe, params)
    scheduler = get_scheduler("constant_with_warmup" if t.scheduler == "constant" else t.scheduler, optimizer,
                              num_warmup_steps=int(t.warmup_ratio * ends[-1]), num_training_steps=ends[-1])
    state = record_or_restore(recipe, run, accelerator, policy, optimizer, scheduler, resume_from, data, ends[-1])

    reference_adapter = adapter_fingerprint(resolve_adapter(recipe.model.adapter)) if recipe.model.adapter else None
    round_idx = sum(state.step >= end for end in ends[:-1])  # rounds already finished
    if round_idx:  # a resumed later round: its reference is the policy that ended the previous one
        load_adapter_weights(policy, run.round(round_idx), REFERENCE,
                             holds=f"the reference of round {round_idx + 1}")
        reference_adapter = adapter_fingerprint(run.round(round_idx))
    _notice_beta(recipe)
    model, optimizer, scheduler = accelerator.prepare(PolicyLogps(policy), optimizer, scheduler)
    if resume_from is not None and is_sharded(accelerator):
        _restore_sharded_optimizer(accelerator, model, optimizer, resume_from)
    policy = policy_of(model)
    _place(recipe, run, accelerator, policy, method, rounds[round_idx])
    if t.report_to:
        accelerator.init_trackers(project_name(recipe), config=flat(to_dict(recipe)),
                                  init_kwargs=init_kwargs(recipe, run.path.name))
    return Setup(recipe, run, accelerator, tokenizer, method, data, rounds, ends, policy, model, params, optimizer,
                 scheduler, state, resume_from, round_idx, reference_adapter)


def _notice_engine_not_used(accelerator: Accelerator) -> None:
    """accelerate runs an FSDP or DeepSpeed config as plain data parallelism on a machine without a GPU, silently:
    every process then holds the whole model. Say so."""
    for engine, variable, kind in (("FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP),
                                   ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "").lower() == "true" and accelerator.distributed_type != kind:
            log(f"notice: the accelerate config asks for {engine}, which needs GPUs; accelerate runs "
                f"{accelerator.distributed_type.value} here instead, each process holding the whole model")


def _restore_sharded_optimizer(accelerator: Accelerator, model, optimizer, checkpoint: Path) -> None:
    """Under FSDP / ZeRO-3, the optimizer state every process wrote into the checkpoint, restored through the engine
    once it has wrapped model and optimizer (a checkpoint of an earlier lora-dpo has none: the moments restart)."""
    folder = checkpoint / SHARDED_OPTIMIZER
    if not folder.is_dir():
        log(f"notice: {checkpoint} holds no sharded optimizer state (written by an earlier lora-dpo); the optimizer's "
            "moments start afresh")
        return
    written_by = json.loads((checkpoint / STATE_FILE).read_text()).get("processes", 1)  # (the loop's state says ours)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and written_by != accelerator.num_processes:
        raise ConfigError(f"resume: {checkpoint} was written by {written_by} processes under DeepSpeed ZeRO-3, "
                          f"whose optimizer state is one partition per process; resume it on {written_by} "
                          f"processes (here: {accelerator.num_processes})")
    load_sharded_optimizer(accelerator, model, optimizer, folder)
    log(f"restored the sharded optimizer state of {checkpoint}")


def _notice_beta(recipe: Recipe) -> None:
    loss = recipe.loss
    if loss.target_kl is not None and not LOSSES[loss.name].finite_optimum and not loss.label_smoothing:
        log(f"notice: loss.target_kl with {loss.name} and no label smoothing: this loss has no finite optimum, "
            "so a larger beta only slows the drift from the reference and cannot pull it back; loss.label_smoothing "
            "(e.g. 0.1) or loss.name=ipo give beta a hold on the KL in both directions")


def _place(recipe: Recipe, run: RunDir, accelerator: Accelerator, policy, method: Method, train_items: list) -> None:
    """The levers that act on the placed model: the embedding table in CPU memory, auto checkpointing."""
    device = accelerator.device
    if recipe.train.embeddings_on_cpu:  # after prepare(), which places the whole model on the device
        freed = embeddings_on_cpu(policy, device)
        log(f"input embeddings in CPU memory: {freed / 2**30:.2f} GiB freed on {device}" if freed else
            f"notice: train.embeddings_on_cpu has no effect here ({'the device is the CPU' if device.type == 'cpu' else 'the head shares the table'})")
    widths = pair_widths(train_items) if method.unit == "pair" else None
    if (auto := apply_auto(recipe, policy, widths, device, method.layout.shared)) is not None:
        checkpointed, layers, line = auto
        log(line)
        if accelerator.is_main_process:  # what auto chose on this device, beside the recipe that says auto
            run.touch_run_info(checkpointed_layers=f"{checkpointed} of {layers}")
