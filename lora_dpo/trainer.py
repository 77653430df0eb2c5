"""The DPO training loop, explicit and on accelerate: forward, loss, accumulate, clip, step, log, evaluate.

Read `train()` top to bottom: it checks the recipe and the data before any model loads, computes the
reference log-probs once, then runs the optimizer steps and writes the run directory of DESIGN.md.
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
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import rundir
from .checkpoint import TrainerState, complete_checkpoints, find_resume_checkpoint, load_checkpoint, save_checkpoint
from .config import Recipe, save_recipe, to_dict
from .data import EncodedPair, build_datasets, collate
from .errors import ConfigError, UserError
from .generate import generate, load_scorer
from .logps import sequence_logps
from .losses import LENGTH_NORMALIZED_BY_DEFAULT, chosen_nll, preference_loss
from .metrics import MetricsLog, PairStats, peak_memory_gb
from .model import load_policy, load_tokenizer, reference_model, save_adapter, trainable_parameters
from .stopping import Interrupted, StopRequest

def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of positions, from a permutation seeded by (seed, epoch): the data order is a pure
    function of the recipe, so a run can be replayed (and later resumed) exactly."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], batch_size: int, pad_id: int, device) -> torch.Tensor:
    """[len(pairs), 2] summed log pi_ref of (chosen, rejected), computed once with the adapter disabled.

    The reference never changes during offline DPO, so this one pass replaces a reference forward in every
    training step (about a third of a step's compute)."""
    out = torch.zeros(len(pairs), 2)
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        b = _to(collate(chunk, pad_id), device)
        with reference_model(model):
            sums = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"]).sums
        out[start : start + len(chunk)] = sums.view(2, -1).T.cpu()
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def pair_losses(recipe: Recipe, model, batch: dict, ref_sums: torch.Tensor | None, stats: PairStats):
    """Loss of one batch of pairs: one concatenated forward of [chosen; rejected], the reference from the
    precomputed table or a no-grad adapter-off pass. Adds the batch's metrics to `stats`; returns the mean loss."""
    policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    if ref_sums is None:
        with reference_model(model):
            ref = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sums
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
def evaluate(recipe: Recipe, model, pairs: list[EncodedPair], ref: torch.Tensor, pad_id: int, device) -> dict:
    """Metrics of the policy on held-out pairs, every pair weighted equally."""
    model.eval()
    stats = PairStats()
    bs = recipe.eval.batch_size
    for start in range(0, len(pairs), bs):
        batch = _to(collate(pairs[start : start + bs], pad_id), device)
        pair_losses(recipe, model, batch, ref[start : start + bs], stats)
    return stats.means()


def behaviour_score(recipe: Recipe, model, tokenizer, pairs: list[EncodedPair], adapter: bool) -> float | None:
    """Mean scorer value over responses sampled for held-out prompts (None when the recipe has no scorer)."""
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
    resume_from = None
    if recipe.resume:
        resume_from = find_resume_checkpoint(out, recipe.resume)
        if resume_from is None:
            log(f"notice: no complete checkpoint in {out / 'checkpoints'}; starting from scratch")
    if resume_from is None:
        rundir.check_fresh(out, recipe.overwrite or bool(recipe.resume))
    else:
        _check_same_recipe(recipe, out / "config.yaml")
    if recipe.eval.scorer:
        load_scorer(recipe.eval.scorer)  # a bad scorer is a recipe error, reported before the model loads
    set_seed(t.seed)

    # 1. Data, checked before any model loads (only the tokenizer is needed to tokenise).
    tokenizer = load_tokenizer(recipe.model)
    train_pairs, eval_pairs, report = build_datasets(recipe.data, tokenizer, t.seed)
    log(report.summary())
    if recipe.eval.max_pairs:
        eval_pairs = eval_pairs[: recipe.eval.max_pairs]

    # 2. Device, precision, trackers, model.
    device = PartialState().device  # the process's device, known before the precision is chosen
    accelerator = Accelerator(
        mixed_precision=mixed_precision(recipe, device.type),
        gradient_accumulation_steps=t.grad_accum,
        log_with=list(t.report_to) or None,
        project_dir=str(out),
    )
    if t.optimizer == "paged_adamw_8bit":
        make_optimizer(recipe, [])  # fail now, not after the model has loaded
    model = load_policy(recipe.model, recipe.lora, device)

    # 3. Schedule: optimizer steps from epochs (or max_steps); warmup then decay.
    micro_per_epoch = math.ceil(len(train_pairs) / t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * micro_per_epoch / t.grad_accum))
    params = trainable_parameters(model)
    optimizer = make_optimizer(recipe, params)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pad_id = tokenizer.pad_token_id

    # 4. A fresh run writes its record; a resumed one restores its state and drops rows logged after it.
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, accelerator.scaler)
        rundir.truncate_metrics(out / "metrics.jsonl", state.step)
        rundir.touch_run_info(out, total_steps=total_steps)  # a live reader (the app) sees the run resume
        log(f"resuming from {resume_from} (step {state.step} of {total_steps})")
    else:
        state = TrainerState()
        out.mkdir(parents=True, exist_ok=True)
        rundir.clear(out)
        save_recipe(recipe, out / "config.yaml")
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        fingerprints = {"train": rundir.data_fingerprint(train_pairs, recipe.model.name),
                        "eval": rundir.data_fingerprint(eval_pairs, recipe.model.name)}
        info = {**rundir.run_info(device, fingerprints), "total_steps": total_steps}
        (out / "run_info.json").write_text(json.dumps(info, indent=2))
    if t.report_to:
        accelerator.init_trackers("lora-dpo", config=_flat(to_dict(recipe)))

    with _out_of_memory_advice(), StopRequest() as stop:
        # 5. Reference log-probs, once; and the baseline: before training the policy *is* the reference
        #    (LoRA's B starts at zero), so its eval metrics are those of the reference model.
        ref_train = None
        if t.precompute_reference:
            ref_train = reference_logps(model, train_pairs, recipe.eval.batch_size, pad_id, device)
        ref_eval = reference_logps(model, eval_pairs, recipe.eval.batch_size, pad_id, device)
        if resume_from is None:
            state.baseline = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device) if eval_pairs else {}
            before = behaviour_score(recipe, model, tokenizer, eval_pairs, adapter=False)
            if before is not None:
                state.baseline["behaviour"] = before
                log(f"behaviour score of the reference model: {before:.3f}")
        if stop.requested:
            raise Interrupted("stopped before the first step; nothing to save")

        # 6. The loop. One micro-batch = batch_size pairs; one optimizer step = grad_accum micro-batches.
        #    The data order is a function of (seed, epoch), so the position (epoch, batch) resumes it.
        metrics = MetricsLog(out / "metrics.jsonl")
        log(f"training: {len(train_pairs)} pairs, {total_steps} steps of {t.batch_size * t.grad_accum} pairs, on {device}")
        bar = tqdm(total=total_steps, initial=state.step, desc="dpo", dynamic_ncols=True, file=sys.stderr)
        window, step_stats = PairStats.from_state(state.window), PairStats()
        window_start, nonfinite_in_a_row, finite = time.perf_counter(), 0, True
        model.train()
        while state.step < total_steps:
            epoch_batches = batches(len(train_pairs), t.batch_size, t.seed, state.epoch)
            for positions in epoch_batches[state.batch_in_epoch :]:
                state.batch_in_epoch += 1
                state.micro += 1
                batch = _to(collate([train_pairs[i] for i in positions], pad_id), device)
                ref = ref_train[positions] if ref_train is not None else None
                with accelerator.accumulate(model):
                    loss = pair_losses(recipe, model, batch, ref, step_stats)
                    finite = finite and bool(torch.isfinite(loss))
                    accelerator.backward(loss)
                    if not accelerator.sync_gradients:
                        continue
                    clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    grad_norm = float(accelerator.clip_grad_norm_(params, clip))
                    finite = finite and math.isfinite(grad_norm)
                    if finite:  # a NaN/inf step is skipped: the adapter keeps its last good weights
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                # -- an optimizer step is complete --
                state.step += 1
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
                step_stats, finite = PairStats(), True
                epoch_f = state.micro / micro_per_epoch
                if state.step % t.log_every == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": state.step, "epoch": epoch_f, "split": "train"}
                    if window.pairs:  # a window of skipped steps only has no numbers to report
                        row.update(window.means(), grad_norm=grad_norm)
                    row.update(lr=scheduler.get_last_lr()[0], pairs_per_s=window.pairs / elapsed,
                               tokens_per_s=window.tokens / elapsed, peak_memory_gb=peak_memory_gb(device),
                               skipped_steps=state.skipped_steps)
                    metrics.write(row)
                    accelerator.log(_numeric(row), step=state.step)
                    if window.pairs:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                                        margin=f"{row['rewards/margins']:.3f}", refresh=False)
                    window, window_start = PairStats(), time.perf_counter()
                    if state.step % (10 * t.log_every) == 0:
                        _refresh_plots(out)
                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps and eval_pairs:
                    row = {"step": state.step, "epoch": epoch_f, "split": "eval",
                           **evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device)}
                    metrics.write(row)
                    accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
                    _refresh_plots(out)
                    model.train()
                periodic = t.save_every and state.step % t.save_every == 0 and not nonfinite_in_a_row
                if periodic or stop.requested:  # (no periodic checkpoint in a NaN streak: keep the last good one)
                    state.window = window.state()
                    path = save_checkpoint(out, state, model, optimizer, scheduler, accelerator.scaler, t.keep_last)
                    if stop.requested:
                        bar.close()
                        metrics.close()
                        raise Interrupted(f"stopped at step {state.step} on {stop.requested}; "
                                          f"resume with: lora-dpo train {out / 'config.yaml'} resume=true  ({path})")
                if state.step >= total_steps:
                    break
            else:  # the epoch is exhausted: the next one starts from its first batch
                state.epoch += 1
                state.batch_in_epoch = 0
        bar.close()

        # 7. Final evaluation, checkpoint, adapter, eval.json, plots.
        final = {"step": state.step, "split": "eval", "pairs": len(eval_pairs), "skipped_steps": state.skipped_steps}
        if eval_pairs:
            row = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device)
            final.update(row)
            metrics.write({"step": state.step, "epoch": state.micro / micro_per_epoch, "split": "eval", **row})
            accelerator.log({f"eval/{k}": v for k, v in _numeric(row).items()}, step=state.step)
        after = behaviour_score(recipe, model, tokenizer, eval_pairs, adapter=True)
        if after is not None:
            final["behaviour"] = after
        final["baseline"] = state.baseline
        metrics.close()
        state.window = PairStats().state()
        save_checkpoint(out, state, model, optimizer, scheduler, accelerator.scaler, t.keep_last)
    accelerator.end_training()
    unwrapped = accelerator.unwrap_model(model)
    with rundir.staged_dir(out / "adapter") as tmp:
        save_adapter(unwrapped, tokenizer, tmp)
    rundir.atomic_text(out / "eval.json", json.dumps(final, indent=2))
    _refresh_plots(out)
    log(_summary(final, out))
    return final


# Keys a resumed run may change: how long it trains and what it records, not what it computes.
RESUMABLE_CHANGES = {"resume", "overwrite", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.report_to"}


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
