"""The DPO training loop, explicit and on accelerate: forward, loss, accumulate, clip, step, log, evaluate.

Read `train()` top to bottom: it checks the recipe and the data before any model loads, computes the
reference log-probs once, then runs the optimizer steps and writes the run directory of DESIGN.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import Recipe, save_recipe
from .data import EncodedPair, build_datasets, collate
from .errors import ConfigError
from .generate import generate, load_scorer
from .logps import sequence_logps
from .losses import LENGTH_NORMALIZED_BY_DEFAULT, preference_loss
from .metrics import MetricsLog, PairStats, peak_memory_gb
from .model import load_policy, load_tokenizer, reference_model, save_adapter, trainable_parameters

RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "adapter", "eval.json")


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def prepare_run_dir(recipe: Recipe) -> Path:
    """Refuse to write over an existing run unless the recipe says overwrite=true, so nothing is lost."""
    out = Path(recipe.output_dir)
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not recipe.overwrite:
        raise ConfigError(
            f"output_dir: {out} already holds a run ({', '.join(existing)}); "
            "choose another output_dir or set overwrite=true"
        )
    return out


def clear_run_dir(out: Path) -> None:
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
    kl_num = (policy.sums.detach() - ref).sum()
    stats.add(
        out.losses, out.chosen_rewards, out.rejected_rewards, policy.sums[:b], policy.sums[b:],
        kl_num, policy.counts.sum(), batch["attention_mask"].sum(),
    )
    return out.losses.mean()


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
    """Run DPO as the recipe says; return the final evaluation (also written to eval.json)."""
    t = recipe.train
    out = prepare_run_dir(recipe)
    if recipe.eval.scorer:
        load_scorer(recipe.eval.scorer)  # a bad scorer is a recipe error, reported before the model loads
    set_seed(t.seed)

    # 1. Data, checked before any model loads (only the tokenizer is needed to tokenise).
    tokenizer = load_tokenizer(recipe.model)
    train_pairs, eval_pairs, report = build_datasets(recipe.data, tokenizer, t.seed)
    log(report.summary())
    if recipe.eval.max_pairs:
        eval_pairs = eval_pairs[: recipe.eval.max_pairs]

    # 2. Device, precision, model.
    device = PartialState().device  # the process's device, known before the precision is chosen
    accelerator = Accelerator(
        mixed_precision=mixed_precision(recipe, device.type), gradient_accumulation_steps=t.grad_accum
    )
    model = load_policy(recipe.model, recipe.lora, device)
    if t.optimizer == "paged_adamw_8bit":
        make_optimizer(recipe, [])  # fail now, not after the reference pass
    out.mkdir(parents=True, exist_ok=True)
    clear_run_dir(out)
    save_recipe(recipe, out / "config.yaml")
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))

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

    # 4. Reference log-probs, once; and the baseline: before training the policy *is* the reference
    #    (LoRA's B starts at zero), so its eval metrics follow from the reference alone.
    ref_train = reference_logps(model, train_pairs, recipe.eval.batch_size, pad_id, device) if t.precompute_reference else None
    ref_eval = reference_logps(model, eval_pairs, recipe.eval.batch_size, pad_id, device)
    baseline = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device) if eval_pairs else {}
    behaviour_before = behaviour_score(recipe, model, tokenizer, eval_pairs, adapter=False)
    if behaviour_before is not None:
        baseline["behaviour"] = behaviour_before
        log(f"behaviour score of the reference model: {behaviour_before:.3f}")

    # 5. The loop. One micro-batch = batch_size pairs; one optimizer step = grad_accum micro-batches.
    metrics = MetricsLog(out / "metrics.jsonl")
    log(f"training: {len(train_pairs)} pairs, {total_steps} steps of {t.batch_size * t.grad_accum} pairs, on {device}")
    bar = tqdm(total=total_steps, desc="dpo", dynamic_ncols=True, file=sys.stderr)
    step, micro, epoch = 0, 0, 0
    stats, window_start = PairStats(), time.perf_counter()
    model.train()
    while step < total_steps:
        for positions in batches(len(train_pairs), t.batch_size, t.seed, epoch):
            batch = _to(collate([train_pairs[i] for i in positions], pad_id), device)
            ref = ref_train[positions] if ref_train is not None else None
            with accelerator.accumulate(model):
                loss = pair_losses(recipe, model, batch, ref, stats)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    grad_norm = float(accelerator.clip_grad_norm_(params, clip))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if grad_norm is None:
                continue
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "epoch": micro / micro_per_epoch, "split": "train", **stats.means()}
                row.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, pairs_per_s=stats.pairs / elapsed,
                           tokens_per_s=stats.tokens / elapsed, peak_memory_gb=peak_memory_gb(device))
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                                margin=f"{row['rewards/margins']:.3f}", refresh=False)
                stats, window_start = PairStats(), time.perf_counter()
            if t.eval_every and step % t.eval_every == 0 and step < total_steps and eval_pairs:
                row = evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device)
                metrics.write({"step": step, "epoch": micro / micro_per_epoch, "split": "eval", **row})
                model.train()
            if step >= total_steps:
                break
        epoch += 1
    bar.close()

    # 6. Final evaluation, adapter, eval.json.
    final = {"step": step, "split": "eval", "pairs": len(eval_pairs)}
    if eval_pairs:
        final.update(evaluate(recipe, model, eval_pairs, ref_eval, pad_id, device))
        metrics.write({"step": step, "epoch": micro / micro_per_epoch, "split": "eval",
                       **{k: v for k, v in final.items() if k not in ("split", "pairs", "step")}})
    behaviour_after = behaviour_score(recipe, model, tokenizer, eval_pairs, adapter=True)
    if behaviour_after is not None:
        final["behaviour"] = behaviour_after
    final["baseline"] = baseline
    metrics.close()
    model = accelerator.unwrap_model(model)
    _atomic_dir(out / "adapter", lambda tmp: save_adapter(model, tokenizer, tmp))
    _atomic_text(out / "eval.json", json.dumps(final, indent=2))
    log(_summary(final, out))
    return final


def _summary(final: dict, out: Path) -> str:
    parts = [f"done: {out}"]
    base = final.get("baseline", {})
    if "rewards/accuracies" in final:
        parts.append(f"eval reward accuracy {final['rewards/accuracies']:.3f}, margin {final['rewards/margins']:.3f}")
    if "behaviour" in final:
        parts.append(f"behaviour {base.get('behaviour', float('nan')):.3f} -> {final['behaviour']:.3f}")
    return "; ".join(parts)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_dir(path: Path, write) -> None:
    """Write a folder next to its final place, then rename it there: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
