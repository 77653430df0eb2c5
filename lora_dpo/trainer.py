"""The DPO training loop, explicit and on accelerate: forward, loss, accumulate, clip, step, log, evaluate.

Read `train()` top to bottom: it checks the recipe and the data before any model loads, computes the
reference log-probs once, then runs the optimizer steps and writes the run directory of DESIGN.md.
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
from .config import Recipe, save_recipe, to_dict
from .data import EncodedPair, build_datasets, collate
from .distributed import (PairStream, PolicyLogps, check_same_global_batch, clip_params, configure_deepspeed,
                          gathered_adapter, is_main_process, is_sharded, max_over_processes, pack_stats, policy_of,
                          reduce_stats, reduce_sum, shards, step_micro_batches, unpack_stats, wants_cpu)
from .errors import ConfigError, UserError
from .generate import generate, load_scorer
from .logps import SequenceLogps
from .losses import LENGTH_NORMALIZED_BY_DEFAULT, chosen_nll, preference_loss
from .metrics import MetricsLog, PairStats, peak_memory_gb
from .model import load_policy, load_tokenizer, reference_model, save_adapter, trainable_parameters
from .refcache import ReferenceCache
from .shared_prompt import check_attention, collate_for, forward_inputs
from .grouping import in_length_order, training_stream
from .offload import activation_offload
from .stopping import Interrupted, StopRequest


def log(msg: str) -> None:
    if is_main_process():
        tqdm.write(msg, file=sys.stderr)


@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], batch_size: int, pad_id: int, accelerator,
                    collate_fn=collate) -> torch.Tensor:
    """[len(pairs), 2] summed log pi_ref of (chosen, rejected), computed once with the adapter disabled.

    The reference never changes during offline DPO, so this one pass replaces a reference forward in every
    training step (about a third of a step's compute). Each process computes its share of the rows and
    leaves the others at zero; a sum over processes then assembles the table, exactly."""
    out = torch.zeros(len(pairs), 2)
    model.eval()
    for idx, ghost in shards(len(pairs), batch_size, accelerator.process_index, accelerator.num_processes):
        b = _to(collate_fn([pairs[i] for i in idx], pad_id), accelerator.device)
        with reference_model(policy_of(model)):
            sums, _ = model(**forward_inputs(b))
        if not ghost:
            out[idx[0] : idx[-1] + 1] = sums.view(2, -1).T.cpu()
    if accelerator.num_processes > 1:
        out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def pair_losses(recipe: Recipe, model, batch: dict, ref_sums: torch.Tensor | None, stats: PairStats):
    """Loss of one batch of pairs: one concatenated forward of [chosen; rejected] through `model` (a prepared
    `PolicyLogps`), the reference from the precomputed table or a no-grad adapter-off pass. Adds the batch's
    metrics to `stats`; returns the mean loss."""
    policy = SequenceLogps(*model(**forward_inputs(batch)))
    if ref_sums is None:
        with reference_model(policy_of(model)):
            ref, _ = model(**forward_inputs(batch))
    else:
        ref = ref_sums.T.reshape(-1).to(policy.sums.device)  # [B, 2] -> [chosen..., rejected...]
    norm = recipe.loss.length_normalize
    if norm is None:
        norm = recipe.loss.name in LENGTH_NORMALIZED_BY_DEFAULT
    counts = policy.counts.clamp(min=1)
    pol, rf = (policy.sums / counts, ref / counts) if norm else (policy.sums, ref)
    b = pol.shape[0] // 2
    out = preference_loss(
        recipe.loss.name, pol[:b], pol[b:], rf[:b], rf[b:], recipe.loss.beta, recipe.loss.label_smoothing
    )
    loss = out.losses
    if recipe.loss.rpo_alpha > 0:
        loss = loss + recipe.loss.rpo_alpha * chosen_nll(policy.sums[:b], policy.counts[:b])
    kl_num = (policy.sums.detach() - ref).sum()
    stats.add(
        loss, out.chosen_rewards, out.rejected_rewards, policy.sums[:b], policy.sums[b:],
        kl_num, policy.counts.sum(), batch["attention_mask"].sum(),
    )
    return loss.mean()


@torch.no_grad()
def evaluate(recipe: Recipe, model, pairs: list[EncodedPair], ref: torch.Tensor, pad_id: int, accelerator) -> dict:
    """Metrics of the policy on held-out pairs, every pair weighted equally, split across processes."""
    model.eval()
    stats = PairStats()
    for idx, ghost in shards(len(pairs), recipe.eval.batch_size, accelerator.process_index, accelerator.num_processes):
        batch = _to(collate_for(recipe.train.shared_prompt)([pairs[i] for i in idx], pad_id), accelerator.device)
        pair_losses(recipe, model, batch, ref[idx], PairStats() if ghost else stats)
    return reduce_stats(accelerator, stats).means()


def behaviour_score(recipe: Recipe, model, tokenizer, pairs: list[EncodedPair], adapter: bool) -> float | None:
    """Mean scorer value over responses sampled for held-out prompts (None when the recipe has no scorer).
    `model` is the peft model. Every process samples the same prompts from the same seed, so all of them get
    the same score without communicating (and under FSDP their collective forwards stay in step)."""
    if not recipe.eval.scorer or recipe.eval.num_prompts == 0 or not pairs:
        return None
    scorer = load_scorer(recipe.eval.scorer)
    prompts = [p.prompt for p in pairs[: recipe.eval.num_prompts]]
    texts = generate(
        model, tokenizer, prompts, adapter=adapter, max_new_tokens=recipe.eval.max_new_tokens,
        temperature=recipe.eval.temperature, seed=recipe.train.seed,
    )
    return sum(float(scorer(t)) for t in texts) / len(texts)


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


def train(recipe: Recipe) -> dict:
    """Run DPO as the recipe says; return the final evaluation (also written to eval.json).

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
    set_seed(t.seed)

    # 1. Data, checked before any model loads (only the tokenizer is needed to tokenise). One process per
    #    machine fills the caches (the toy world, datasets) before the others read them.
    with procs.local_main_process_first():
        tokenizer = load_tokenizer(recipe.model)
        train_pairs, eval_pairs, report = build_datasets(recipe.data, tokenizer, t.seed)
    log(report.summary())
    if recipe.eval.max_pairs:
        eval_pairs = eval_pairs[: recipe.eval.max_pairs]

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
    if t.optimizer == "paged_adamw_8bit":
        make_optimizer(recipe, [])  # fail now, not after the model has loaded
    policy = load_policy(recipe.model, recipe.lora, device, sharded)
    if t.shared_prompt:
        check_attention(policy)  # the shared-prompt layout needs an attention that takes a 4D mask
    collate_fn = collate_for(t.shared_prompt)  # plain [prompt+chosen; prompt+rejected] or shared-prompt rows

    # 3. Schedule: optimizer steps from epochs (or max_steps); warmup then decay. Each step averages exactly
    #    `pairs_per_step` pairs of the data stream (distributed.py), so the step count is the same for any
    #    number of processes with the same global batch.
    n_train = len(train_pairs)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * n_train / pairs_per_step))
    params = trainable_parameters(policy)
    optimizer = make_optimizer(recipe, params)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    pad_id = tokenizer.pad_token_id

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
            (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
            fingerprints = {"train": rundir.data_fingerprint(train_pairs, recipe.model.name),
                            "eval": rundir.data_fingerprint(eval_pairs, recipe.model.name)}
            info = {**rundir.run_info(device, fingerprints), "processes": world, "total_steps": total_steps}
            (out / "run_info.json").write_text(json.dumps(info, indent=2))
    state.pairs_per_step, state.processes = pairs_per_step, world
    model, optimizer, scheduler = accelerator.prepare(PolicyLogps(policy), optimizer, scheduler)
    policy = policy_of(model)
    if t.report_to:
        accelerator.init_trackers("lora-dpo", config=_flat(to_dict(recipe)))

    def checkpoint() -> Path:
        """All processes call this: their RNG states go to the main one, which writes the checkpoint."""
        rngs = gather_object([rng_state()]) if world > 1 else None
        adapter = gathered_adapter(accelerator, model) if sharded else None
        if main:
            save_checkpoint(out, state, policy, None if sharded else optimizer, scheduler, accelerator.scaler,
                            t.keep_last, rngs, adapter)
        accelerator.wait_for_everyone()
        return checkpoint_dir(out) / f"step-{state.step}"

    with _out_of_memory_advice(), StopRequest() as stop:
        # 5. Reference log-probs, once; and the baseline: before training the policy *is* the reference
        #    (LoRA's B starts at zero), so its eval metrics are those of the reference model.
        #    The tables come from the on-disk cache when their fingerprint matches (refcache.py).
        ref_cache = ReferenceCache.for_run(recipe, tokenizer, policy, device, accelerator)
        ref_train = None
        if t.precompute_reference:
            ref_train = ref_cache.table(train_pairs, lambda: in_length_order(
                lambda ps: reference_logps(model, ps, recipe.eval.batch_size, pad_id, accelerator, collate_fn),
                train_pairs, t.shared_prompt))
        ref_eval = ref_cache.table(eval_pairs, lambda: in_length_order(
            lambda ps: reference_logps(model, ps, recipe.eval.batch_size, pad_id, accelerator, collate_fn),
            eval_pairs, t.shared_prompt))
        if resume_from is None:
            state.baseline = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, accelerator) if eval_pairs else {}
            before = behaviour_score(recipe, policy, tokenizer, eval_pairs, adapter=False)
            if before is not None:
                state.baseline["behaviour"] = before
                log(f"behaviour score of the reference model: {before:.3f}")
        if reduce_sum(accelerator, [float(bool(stop.requested))])[0]:
            raise Interrupted("stopped before the first step; nothing to save")

        # 6. The loop. One optimizer step = grad_accum micro-batches of batch_size pairs on each process, the
        #    next `pairs_per_step` pairs of the data stream; the stream position (pairs_seen) resumes it.
        metrics = MetricsLog(out / "metrics.jsonl") if main else _Discard()
        log(f"training: {n_train} pairs, {total_steps} steps of {pairs_per_step} pairs "
            f"({t.batch_size} x {t.grad_accum} x {world} process(es)), on {device}")
        bar = tqdm(total=total_steps, initial=state.step, desc="dpo", dynamic_ncols=True, file=sys.stderr,
                   disable=not main)
        stream = training_stream(train_pairs, t.seed, pairs_per_step, t.group_by_length, t.shared_prompt)
        window, nonfinite_in_a_row = PairStats.from_state(state.window), 0
        window_start = time.perf_counter()
        model.train()
        while state.step < total_steps:
            step_stats, finite = PairStats(), True
            for positions in step_micro_batches(stream, state.pairs_seen, t.batch_size, t.grad_accum, rank, world):
                batch = _to(collate_fn([train_pairs[i] for i in positions], pad_id), device)
                ref = ref_train[positions] if ref_train is not None else None
                with accelerator.accumulate(model):
                    with activation_offload(t.activation_offload, device):  # saved activations wait on the CPU
                        loss = pair_losses(recipe, model, batch, ref, step_stats)
                    finite = finite and bool(torch.isfinite(loss))
                    accelerator.backward(loss)
            # The last micro-batch synchronised the gradients: each is now the mean over the step's pairs.
            assert accelerator.sync_gradients, "micro-batches out of step with accelerate's accumulation"
            clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(clip_params(accelerator, model, params), clip))
            # One reduction per step: the metric sums, and whether any process saw a non-finite loss or
            # gradient norm, or was asked to stop; so every process skips, logs and stops alike.
            local_bad = not (finite and math.isfinite(grad_norm))
            *sums, bad, stops = reduce_sum(accelerator, pack_stats(step_stats) + [float(local_bad), float(bool(stop.requested))])
            step_stats, finite, stopping = unpack_stats(sums), bad == 0, stops > 0
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
            epoch_f = state.pairs_seen / n_train
            if state.step % t.log_every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": state.step, "epoch": epoch_f, "split": "train"}
                if window.pairs:  # a window of skipped steps only has no numbers to report
                    row.update(window.means(), grad_norm=grad_norm)
                row.update(lr=scheduler.get_last_lr()[0], pairs_per_s=window.pairs / elapsed,
                           tokens_per_s=window.tokens / elapsed,
                           peak_memory_gb=max_over_processes(accelerator, peak_memory_gb(device)),
                           skipped_steps=state.skipped_steps)
                metrics.write(row)
                accelerator.log(_numeric(row), step=state.step)
                if window.pairs:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                                    margin=f"{row['rewards/margins']:.3f}", refresh=False)
                window, window_start = PairStats(), time.perf_counter()
                if state.step % (10 * t.log_every) == 0 and main:
                    _refresh_plots(out)
            if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps and eval_pairs:
                row = {"step": state.step, "epoch": epoch_f, "split": "eval",
                       **evaluate(recipe, model, eval_pairs, ref_eval, pad_id, accelerator)}
                metrics.write(row)
                accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
                if main:
                    _refresh_plots(out)
                model.train()
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
        final = {"step": state.step, "split": "eval", "pairs": len(eval_pairs), "skipped_steps": state.skipped_steps}
        if eval_pairs:
            row = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, accelerator)
            final.update(row)
            metrics.write({"step": state.step, "epoch": state.pairs_seen / n_train, "split": "eval", **row})
            accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
        after = behaviour_score(recipe, policy, tokenizer, eval_pairs, adapter=True)
        if after is not None:
            final["behaviour"] = after
        final["baseline"] = state.baseline
        metrics.close()
        state.window = PairStats().state()
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


class _Discard:
    """The metrics log of a process that writes nothing (not the main one)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# Keys a resumed run may change: how long it trains and what it records, not what it computes.
# The split of the global batch into batch_size x grad_accum x processes may change too: it is checked on its own.
RESUMABLE_CHANGES = {"resume", "overwrite", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.report_to", "train.batch_size", "train.grad_accum",
                     "train.reference_cache", "train.activation_offload"}


def _check_same_recipe(recipe: Recipe, saved_path: Path) -> None:
    """A resumed run must compute what the interrupted one computed; refuse other changes by name."""
    from .config import load_recipe

    saved, now = _flat(to_dict(load_recipe(saved_path))), _flat(to_dict(recipe))
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in RESUMABLE_CHANGES)
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
            "lower data.max_length / data.max_prompt_length, keep model.gradient_checkpointing=true, "
            "use model.quantization=nf4, or lower lora.r"
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
    if "rewards/accuracies" in final:
        parts.append(f"eval reward accuracy {final['rewards/accuracies']:.3f}, margin {final['rewards/margins']:.3f}")
    if "behaviour" in final:
        parts.append(f"behaviour {base.get('behaviour', float('nan')):.3f} -> {final['behaviour']:.3f}")
    return "; ".join(parts)
