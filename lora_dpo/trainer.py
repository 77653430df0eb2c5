"""The training loop, explicit and on accelerate: forward, loss, accumulate, clip, step, log, evaluate.

Read `train()` top to bottom: it checks the recipe and the data before any model loads, computes the
reference log-probs once (per round), then runs the optimizer steps and writes the run directory of DESIGN.md.
What is computed on a batch (DPO and its relatives, KTO, SFT, online DPO) is the objective's (objectives.py);
the loop is the same for all.
The same loop runs in several processes under `accelerate launch` (see distributed.py); only the main
process writes the run directory and the terminal.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import rundir
from .checkpoint import (TrainerState, checkpoint_dir, complete_checkpoints, find_resume_checkpoint, load_checkpoint,
                         rng_state, save_checkpoint)
from .checkpointing import apply_auto
from .config import Recipe, save_recipe, to_dict
from .distributed import (PolicyLogps, check_same_global_batch, clip_params, configure_deepspeed,
                          gathered_adapter, is_main_process, is_sharded, max_over_processes, policy_of, reduce_sum,
                          step_micro_batches, wants_cpu)
from .errors import ConfigError, UserError
from .generate import load_scorer
from .metrics import MetricsLog, peak_memory_gb
from .model import (load_policy, load_round_reference, load_tokenizer, resolve_adapter, save_adapter, snapshot_reference,
                    trainable_parameters)
from .grouping import training_stream
from .objectives import make_objective
from .offload import activation_offload, embeddings_on_cpu
from .probes import AdaptiveBeta, Sampler, measure_kl
from .refcache import adapter_fingerprint
from .shared_prompt import check_attention, fallback_notice
from .tiling import tile_mlps
from .stopping import Interrupted, StopRequest


def log(msg: str) -> None:
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)


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
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def round_steps(recipe: Recipe, sizes: list[int], pairs_per_step: int) -> list[int]:
    """Optimizer steps of each round: train.max_steps, or train.epochs over the round's data."""
    t = recipe.train
    return [t.max_steps or max(1, math.ceil(t.epochs * n / pairs_per_step)) for n in sizes]


def train(recipe: Recipe) -> dict:
    """Train as the recipe says (DPO and its relatives, KTO, SFT, online DPO, in rounds); return the final
    evaluation (also written to eval.json).

    Raises `Interrupted` after a safe stop (checkpoint written) and `UserError` for what the user can fix."""
    t = recipe.train
    out = Path(recipe.output_dir)
    procs = PartialState(cpu=wants_cpu())  # one process, or one of several under `accelerate launch`
    world = procs.num_processes
    pairs_per_step = t.batch_size * t.grad_accum * world  # the global batch
    resume_from = None
    if recipe.resume:
        resume_from = find_resume_checkpoint(out, recipe.resume)
        if resume_from is None:
            log(f"notice: no complete checkpoint in {out / 'checkpoints'}; starting from scratch")
    if resume_from is None:
        rundir.check_fresh(out, recipe.overwrite or bool(recipe.resume))
    else:
        _check_same_recipe(recipe, out / "config.yaml")
        check_same_global_batch(resume_from, recipe.train, world)
    if recipe.eval.scorer:
        load_scorer(recipe.eval.scorer)  # a bad scorer is a recipe error, reported before the model loads
    if recipe.model.adapter:
        resolve_adapter(recipe.model.adapter)  # and so is a missing start adapter
    if recipe.online.enabled:
        from .online import check_judge_spec

        check_judge_spec(recipe.online.judge)  # and a judge that cannot be imported
    set_seed(t.seed)

    # 1. Data, checked before any model loads (only the tokenizer is needed to tokenise). One process per
    #    machine fills the caches (the toy world, datasets) before the others read them.
    with procs.local_main_process_first():
        tokenizer = load_tokenizer(recipe.model)
        objective = make_objective(recipe, tokenizer)
        rounds = [objective.train] + [objective.load_train(src) for src in recipe.data.rounds]
    log(objective.report.summary())
    for notice in objective.notices:
        log(notice)
    rounds += [objective.train] * (t.rounds - len(rounds))  # rounds without data of their own reuse data.train

    # 2. Device, precision, trackers, model.
    device = procs.device  # the process's device, known before the precision is chosen
    accelerator = Accelerator(
        cpu=wants_cpu(),
        mixed_precision=mixed_precision(recipe, device.type),
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not steps x processes
        log_with=list(t.report_to) or None,
        project_dir=str(out),
        # the buffers (rotary frequencies) are constants: broadcasting them before every forward is wasted
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    main, rank = accelerator.is_main_process, accelerator.process_index
    sharded = is_sharded(accelerator)
    configure_deepspeed(accelerator, t.batch_size, t.max_grad_norm)
    if t.embeddings_on_cpu and sharded:
        raise ConfigError("train.embeddings_on_cpu: FSDP and DeepSpeed ZeRO-3 place the weights themselves (each process "
                          "holds a shard of the table already); set it to false")
    if t.optimizer == "paged_adamw_8bit":
        make_optimizer(recipe, [])  # fail now, not after the model has loaded
    policy = load_policy(recipe.model, recipe.lora, device, sharded, reference_adapter=t.rounds > 1)
    if t.mlp_chunks > 1:
        tile_mlps(policy, t.mlp_chunks)
    if objective.shared and not check_attention(policy, explicit=t.shared_prompt is True):
        log(fallback_notice(f"attention '{policy.config._attn_implementation}' takes no custom 4D mask"))
        objective.set_shared(False)
    if recipe.model.adapter:
        log(f"policy and reference start from the adapter {resolve_adapter(recipe.model.adapter)} (two adapters on "
            "one base; the lora.* keys come from it)")

    # 3. Schedule: optimizer steps from epochs (or max_steps) in each round; warmup then decay over them all.
    #    Each step averages exactly `pairs_per_step` examples of the round's data stream (distributed.py), so
    #    the step count is the same for any number of processes with the same global batch.
    steps = round_steps(recipe, [len(r) for r in rounds], pairs_per_step)
    ends = [sum(steps[: k + 1]) for k in range(len(steps))]  # the step that ends each round
    total_steps = ends[-1]
    params = trainable_parameters(policy)
    optimizer = make_optimizer(recipe, params)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    # 4. A resumed run restores its state before the engine wraps the model (under FSDP the adapter is then
    #    sharded from the restored weights); a fresh run writes its record. Every process has checked the run
    #    directory (above) before the main one writes to it.
    accelerator.wait_for_everyone()
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, None if sharded else optimizer, scheduler, accelerator.scaler,
                                rank, world)
        if main:
            rundir.truncate_metrics(out / "metrics.jsonl", state.step)
            rundir.touch_run_info(out, total_steps=total_steps)  # a live reader (the app) sees the run resume
        log(f"resuming from {resume_from} (step {state.step} of {total_steps}; "
            f"written by {state.processes} process(es), resumed by {world})")
    else:
        state = TrainerState()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            rundir.clear(out)
            save_recipe(recipe, out / "config.yaml")
            (out / "data_report.json").write_text(json.dumps(objective.report.to_dict(), indent=2))
            info = {**rundir.run_info(device, objective.fingerprints()), "processes": world, "total_steps": total_steps}
            (out / "run_info.json").write_text(json.dumps(info, indent=2))
    state.pairs_per_step, state.processes = pairs_per_step, world
    round_idx = sum(state.step >= end for end in ends[:-1])  # rounds already finished
    if round_idx:  # a resumed later round: its reference is the policy that ended the previous one
        load_round_reference(policy, out, round_idx)
        objective.set_train(rounds[round_idx])
        objective.reference_adapter = adapter_fingerprint(out / "rounds" / f"round-{round_idx}")
    controller = None
    if recipe.loss.target_kl is not None and recipe.loss.name in ("dpo", "robust", "kto") and not recipe.loss.label_smoothing:
        log(f"notice: loss.target_kl with {recipe.loss.name} and no label smoothing: this loss has no finite optimum, "
            "so a larger beta only slows the drift from the reference and cannot pull it back; loss.label_smoothing "
            "(e.g. 0.1) or loss.name=ipo give beta a hold on the KL in both directions")
    if recipe.loss.target_kl is not None:
        controller = AdaptiveBeta(state.beta or recipe.loss.beta, recipe.loss.target_kl, floor=recipe.loss.beta)
        objective.beta = controller.beta
    model, optimizer, scheduler = accelerator.prepare(PolicyLogps(policy), optimizer, scheduler)
    policy = policy_of(model)
    if t.embeddings_on_cpu:  # after prepare(), which places the whole model on the device
        freed = embeddings_on_cpu(policy, device)
        log(f"input embeddings in CPU memory: {freed / 2**30:.2f} GiB freed on {device}" if freed else
            f"notice: train.embeddings_on_cpu has no effect here ({'the device is the CPU' if device.type == 'cpu' else 'the head shares the table'})")
    if (auto := apply_auto(recipe, policy, objective, device)) is not None:  # model.gradient_checkpointing: auto
        checkpointed, layers, line = auto
        log(line)
        if main:  # what auto chose on this device, beside the recipe that says auto
            rundir.touch_run_info(out, checkpointed_layers=f"{checkpointed} of {layers}")
    if t.report_to:
        accelerator.init_trackers("lora-dpo", config=_flat(to_dict(recipe)))
    sampler = Sampler(recipe, tokenizer, objective.prompts("eval"), log)

    def checkpoint() -> Path:
        """All processes call this: their RNG states go to the main one, which writes the checkpoint."""
        rngs = gather_object([rng_state()]) if world > 1 else None
        adapter = gathered_adapter(accelerator, model) if sharded else None
        state.beta = controller.beta if controller else None
        if main:
            save_checkpoint(out, state, policy, None if sharded else optimizer, scheduler, accelerator.scaler,
                            t.keep_last, rngs, adapter)
        accelerator.wait_for_everyone()
        return checkpoint_dir(out) / f"step-{state.step}"

    def evaluation() -> dict:
        """Held-out metrics, then the sampled figures of the policy; leaves the model in train mode."""
        row = objective.evaluate(model, accelerator) if objective.eval else {}
        row.update(sampler(policy, adapter=True))
        model.train()
        return row

    with _out_of_memory_advice(), StopRequest() as stop:
        # 5. Reference log-probs, once per round; and the baseline: before training the policy *is* the
        #    reference (LoRA's B starts at zero, or the policy is a copy of the start adapter), so its eval
        #    metrics are those of the reference model.
        objective.prepare(model, accelerator)
        if resume_from is None:
            state.baseline = objective.evaluate(model, accelerator) if objective.eval else {}
            state.baseline.update(sampler(policy, adapter=False))
            if "behaviour" in state.baseline:
                log(f"behaviour score of the reference model: {state.baseline['behaviour']:.3f}")
        elif sampler.prompts:
            sampler.reference_distinct = state.baseline.get("diversity/distinct_2")
        if reduce_sum(accelerator, [float(bool(stop.requested))])[0]:
            raise Interrupted("stopped before the first step; nothing to save")

        # 6. The loop. One optimizer step = grad_accum micro-batches of batch_size examples on each process, the
        #    next `pairs_per_step` examples of the round's data stream; the step count locates it on resume.
        metrics = MetricsLog(out / "metrics.jsonl") if main else _Discard()
        unit = objective.unit
        log(f"training: {len(objective.train)} {unit}s, {total_steps} steps of {pairs_per_step} {unit}s "
            f"({t.batch_size} x {t.grad_accum} x {world} process(es)){f', {t.rounds} rounds' if t.rounds > 1 else ''}"
            f", on {device}")
        bar = tqdm(total=total_steps, initial=state.step, desc=recipe.stage if recipe.stage != "dpo" else recipe.loss.name,
                   dynamic_ncols=True, file=sys.stderr, disable=not main)
        grouped = t.group_by_length and objective.unit == "pair"  # (single completions are not regrouped)
        stream = training_stream(objective.train, t.seed + round_idx, pairs_per_step, grouped, objective.shared)
        window, nonfinite_in_a_row = objective.Stats.from_state(state.window), 0
        window_start, probe = time.perf_counter(), {}
        model.train()
        while state.step < total_steps:
            start = ends[round_idx - 1] if round_idx else 0
            position = (state.step - start) * pairs_per_step  # the step's place in this round's stream
            step_stats, finite = objective.Stats(), True
            objective.step = state.step  # (online DPO seeds its sampling with it)
            for positions in step_micro_batches(stream, position, t.batch_size, t.grad_accum, rank, world):
                with accelerator.accumulate(model):
                    with activation_offload(t.activation_offload, device):  # saved activations wait on the CPU
                        loss = objective.loss(model, positions, step_stats, device)
                    finite = finite and bool(torch.isfinite(loss))
                    accelerator.backward(loss)
            # The last micro-batch synchronised the gradients: each is now the mean over the step's examples.
            assert accelerator.sync_gradients, "micro-batches out of step with accelerate's accumulation"
            clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(clip_params(accelerator, model, params), clip))
            # One reduction per step: the metric sums, and whether any process saw a non-finite loss or
            # gradient norm, or was asked to stop; so every process skips, logs and stops alike.
            local_bad = not (finite and math.isfinite(grad_norm))
            *sums, bad, stops = reduce_sum(accelerator, step_stats.vector() + [float(local_bad), float(bool(stop.requested))])
            step_stats, finite, stopping = objective.Stats.from_vector(sums), bad == 0, stops > 0
            if finite:  # a NaN/inf step is skipped: the adapter keeps its last good weights
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # -- an optimizer step is complete --
            state.step += 1
            state.pairs_seen += pairs_per_step
            bar.update(1)
            if finite:
                window.merge(step_stats)
                nonfinite_in_a_row = 0
            else:
                state.skipped_steps += 1
                nonfinite_in_a_row += 1
                log(f"step {state.step}: non-finite loss or gradient norm; step skipped")
                if nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise _diverged(state, out)
            if controller and state.step % recipe.loss.kl_every == 0:
                kl = reduce_sum(accelerator, [measure_kl(recipe, policy, tokenizer, objective, state.step)])[0] / world
                probe = {"kl/sampled": kl}  # (the processes' mean: every one then sets the same beta)
                probe["beta"] = objective.beta = controller.update(probe["kl/sampled"])
                model.train()
            epoch_f = (state.step - start) * pairs_per_step / len(objective.train)
            where = {"step": state.step, "epoch": epoch_f} | ({"round": round_idx + 1} if t.rounds > 1 else {})
            if state.step % t.log_every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_start
                row = {**where, "split": "train"}
                if window.pairs:  # a window of skipped steps only has no numbers to report
                    row.update(window.means(), grad_norm=grad_norm)
                row.update(probe, lr=scheduler.get_last_lr()[0], pairs_per_s=window.pairs / elapsed,
                           tokens_per_s=window.tokens / elapsed,
                           peak_memory_gb=max_over_processes(accelerator, peak_memory_gb(device)),
                           skipped_steps=state.skipped_steps)
                if controller:
                    row["beta"] = objective.beta
                metrics.write(row)
                accelerator.log(_numeric(row), step=state.step)
                if window.pairs and "loss" in row:
                    bar.set_postfix(_postfix(row), refresh=False)
                window, window_start, probe = objective.Stats(), time.perf_counter(), {}
                if state.step % (10 * t.log_every) == 0 and main:
                    _refresh_plots(out)
            round_end = state.step == ends[round_idx] and state.step < total_steps
            periodic_eval = t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps
            if round_end or periodic_eval:
                row = {**where, "split": "eval", **evaluation()}
                metrics.write(row)
                accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
                if main:
                    _refresh_plots(out)
            if round_end:  # iterative DPO: the policy becomes the frozen reference of the next round
                if main:
                    with rundir.staged_dir(out / "rounds" / f"round-{round_idx + 1}") as tmp:
                        save_adapter(policy, tokenizer, tmp)
                accelerator.wait_for_everyone()
                snapshot_reference(policy)
                round_idx += 1
                objective.set_train(rounds[round_idx])
                stream = training_stream(objective.train, t.seed + round_idx, pairs_per_step, grouped, objective.shared)
                objective.reference_adapter = adapter_fingerprint(out / "rounds" / f"round-{round_idx}")
                objective.prepare(model, accelerator)
                model.train()
                log(f"round {round_idx + 1} of {t.rounds}: the policy of step {state.step} is the new reference "
                    f"({out / 'rounds' / f'round-{round_idx}'})")
            periodic = t.save_every and state.step % t.save_every == 0 and not nonfinite_in_a_row
            if periodic or stopping:  # (no periodic checkpoint in a NaN streak: keep the last good one)
                state.window = window.state()
                path = checkpoint()
                if stopping:
                    bar.close()
                    metrics.close()
                    raise Interrupted(f"stopped at step {state.step} on {stop.requested or 'a request to another process'}; "
                                      f"resume with: lora-dpo train {out / 'config.yaml'} resume=true  ({path})")
        bar.close()

        # 7. Final evaluation, checkpoint, adapter, eval.json, plots.
        final = {"step": state.step, "split": "eval", f"{objective.unit}s": len(objective.eval),
                 "skipped_steps": state.skipped_steps}
        row = evaluation()
        where = {"step": state.step, "epoch": (state.step - (ends[round_idx - 1] if round_idx else 0)) * pairs_per_step
                 / len(objective.train)} | ({"round": round_idx + 1} if t.rounds > 1 else {})
        if row:
            final.update(row)
            metrics.write({**where, "split": "eval", **row})
            accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
        if controller:
            final["beta"] = objective.beta
        final["baseline"] = state.baseline
        metrics.close()
        state.window = objective.Stats().state()
        checkpoint()
    adapter = gathered_adapter(accelerator, model) if sharded else None
    if main:
        with rundir.staged_dir(out / "adapter") as tmp:
            save_adapter(policy, tokenizer, tmp, adapter)
        rundir.atomic_text(out / "eval.json", json.dumps(final, indent=2))
        _refresh_plots(out)
        log(_summary(final, out))
    accelerator.wait_for_everyone()  # no process returns before the run directory is complete
    accelerator.end_training()  # (this also ends the process group)
    return final


def _postfix(row: dict) -> dict:
    keys = (("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".2f"), ("rewards/margins", "margin", ".3f"),
            ("ppl", "ppl", ".2f"), ("beta", "beta", ".3g"))
    return {short: f"{row[k]:{fmt}}" for k, short, fmt in keys if k in row}


class _Discard:
    """The metrics log of a process that writes nothing (not the main one)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# Keys a resumed run may change: how long it trains, what it records and how it spends memory, not what it computes.
# The split of the global batch into batch_size x grad_accum x processes may change too: it is checked on its own.
RESUMABLE_CHANGES = {"resume", "overwrite", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.report_to", "train.batch_size", "train.grad_accum",
                     "train.reference_cache", "train.activation_offload", "train.embeddings_on_cpu",
                     "train.mlp_chunks", "model.gradient_checkpointing"}


def _check_same_recipe(recipe: Recipe, saved_path: Path) -> None:
    """A resumed run must compute what the interrupted one computed; refuse other changes by name."""
    from .config import load_recipe

    saved, now = _flat(to_dict(load_recipe(saved_path))), _flat(to_dict(recipe))
    # (with rounds, the steps per round place the round boundaries: they stay as they were)
    resumable = RESUMABLE_CHANGES - ({"train.epochs", "train.max_steps"} if recipe.train.rounds > 1 else set())
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in resumable)
    if changed:
        raise ConfigError(
            f"resume: the recipe differs from the run's {saved_path} in {', '.join(changed)}; "
            "a resumed run must train the same way (start a new output_dir to change them)"
        )


def _diverged(state: TrainerState, out: Path) -> UserError:
    done = complete_checkpoints(out)
    kept = f"the last good checkpoint is kept: {done[-1]}" if done else "no checkpoint was written yet"
    return UserError(
        f"training stopped at step {state.step}: the loss or gradient norm was NaN/inf in "
        f"{state.skipped_steps} step(s), the last ones in a row. Likely causes: a learning rate too high "
        "(train.lr), fp16 overflow (model.dtype=bf16 or fp32), or bad rows in the data (lora-dpo data RECIPE). "
        f"{kept}"
    )


@contextlib.contextmanager
def _out_of_memory_advice():
    """Turn a CUDA out-of-memory error into the recipe keys that reduce memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            "out of GPU memory. Reduce train.batch_size (raise train.grad_accum to keep the pairs per step), "
            "lower data.max_length / data.max_prompt_length, set model.gradient_checkpointing=true (every layer; "
            "auto plans for the memory free when the run starts), use model.quantization=nf4, or lower lora.r; "
            "`lora-dpo plan RECIPE --gpu-memory SIZE` proposes settings that fit"
        ) from None


def _refresh_plots(out: Path) -> None:
    """Plots are a view of metrics.jsonl; failing to draw them (a full disk, say) must not end a run."""
    from .plots import write_plots

    try:
        write_plots(out)
    except Exception as exc:  # noqa: BLE001 - any plotting failure is reported and training goes on
        log(f"warning: could not refresh plots in {out / 'plots'}: {exc}")


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested recipe -> {"train.lr": ...} with values trackers accept (lists become strings)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _summary(final: dict, out: Path) -> str:
    parts = [f"done: {out}"]
    base = final.get("baseline", {})
    if "ppl" in final:
        parts.append(f"eval loss {base.get('loss', float('nan')):.3f} -> {final['loss']:.3f} (perplexity {final['ppl']:.2f})")
    if "rewards/accuracies" in final:
        parts.append(f"eval reward accuracy {final['rewards/accuracies']:.3f}, margin {final['rewards/margins']:.3f}")
    if "behaviour" in final:
        parts.append(f"behaviour {base.get('behaviour', float('nan')):.3f} -> {final['behaviour']:.3f}")
    return "; ".join(parts)
