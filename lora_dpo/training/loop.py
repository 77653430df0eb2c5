"""The training loop, explicit and on accelerate, as named phases: setup, reference pass, steps, evaluation, end
of round, finish.

Read `train()` and then `Session.run_steps()` top to bottom. What is computed on a micro-batch (DPO and its
relatives, KTO, SFT, online DPO) is the method's (methods/); the loop is the same for all and owns everything
else: the data of each round, beta, the reference tables, the schedule, accumulation, clipping, skipping,
logging, checkpoints and the processes. The same loop runs in several processes under `accelerate launch`;
only the main process writes the run directory and the terminal.

Host-device syncs (each one stalls a GPU until its queue drains) are named where they happen: one per optimizer
step (whether to apply it: a non-finite loss or gradient norm, a stop request), and those of a logged step (the
window's metrics, the gradient norm, the peak memory). Nothing in a micro-batch turns a tensor into a Python
number, indexes by a mask or copies from pageable memory (data/batches.to_device pins it).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import gather_object

from ..config import Recipe
from ..errors import UserError, first_line
from ..core.stats import Stats, home
from ..data.order import PairStream, shards, step_micro_batches, training_stream
from ..memory.track import peak_memory_gb
from ..methods import Data, StepContext
from ..model.adapters import adapter_fingerprint, save_adapter, snapshot_reference, write_adapter
from ..model.offload import activation_offload
from ..progress import phase, progress, stop_recording
from ..run.card import hub_model_id, write_card
from ..run.checkpoint import SHARDED_OPTIMIZER, rng_state, save_checkpoint, staging
from ..run.metrics import DiscardLog, MetricsLog, read_metrics
from ..run.plots import write_plots
from ..run.rundir import RunDir, staged_dir
from ..run.source import resolve_source
from .distributed import (
    clip_params, gathered_adapter, log, max_over_processes, reduce_stats, reduce_sum, save_sharded_optimizer,
)
from .probes import AdaptiveBeta, Sampler, measure_kl
from .reference import ReferenceTables, reference_tables
from .setup import Setup, setup
from .stopping import EARLY_STOP, Interrupted, StopRequest, diverged, out_of_memory_advice


def train(recipe: Recipe) -> dict:
    """Train as the recipe says (DPO and its relatives, KTO, SFT, online DPO, in rounds); return the final
    evaluation (also written to eval.json).

    Raises `Interrupted` after a safe stop (checkpoint written), `StoppedEarly` (a KeyboardInterrupt) for a stop
    while the run prepares (nothing to save), and `UserError` for what the user can fix."""
    try:
        with StopRequest() as stop:  # from the start: a stop while preparing ends the run at once
            session = Session(setup(recipe))
            with out_of_memory_advice():
                session.reference_pass()
                session.baseline(stop)
                stop.training = True  # from here a stop finishes the step and writes a checkpoint
                session.run_steps(stop)
                final = session.finish()
            session.refuse_non_finite(final)
            session.write_result(final)
        return final
    except Exception as exc:
        if (why := _write_failure(exc, RunDir(recipe.output_dir))) is None:
            raise
        raise why from None
    finally:
        stop_recording()  # the run's progress.json: a phase still open (a failure, a stop) ends here
        RunDir(recipe.output_dir).release()  # the run directory's lock (RunDir.hold), however the run ended


def _write_failure(exc: Exception, run: RunDir) -> UserError | None:
    """The run's folder could not be written (a full disk or quota, a read-only file system) as one message naming
    it and the checkpoint to resume from; None for any other error. torch.save and safetensors report a full disk
    in their own exception types, so a disk with almost no space left counts too."""
    errors = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    if isinstance(exc, OSError) and exc.errno in errors:
        why = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    else:
        try:
            full = shutil.disk_usage(run.path).free < 1 << 20
        except OSError:
            full = False
        if not full:
            return None
        why = f"{os.strerror(errno.ENOSPC)} ({first_line(exc)})"
    done = run.complete_checkpoints() if run.checkpoints.is_dir() else []
    return UserError(f"output_dir: cannot write in {run.path}: {why}. Free space there (or make it writable), then "
                     "continue with resume=true" + (f" from the last complete checkpoint, {done[-1]}" if done else ""))


@dataclass
class Session:
    """A run in progress: what setup built, and where the loop stands."""

    s: Setup
    tables: ReferenceTables = field(default_factory=ReferenceTables)
    stream: Optional[PairStream] = None
    metrics: object = field(default_factory=DiscardLog)

    def __post_init__(self):
        s = self.s
        loss = s.recipe.loss
        self.controller = AdaptiveBeta(loss.target_kl, floor=loss.beta) if loss.target_kl is not None else None
        self.beta = s.state.beta if s.state.beta is not None else loss.beta  # the loop's beta: its one owner
        self.sampler = Sampler(s.recipe, s.tokenizer, [e.prompt for e in s.data.eval], log, show=s.main)
        self.stream = self._stream()

    # -- phases
    def reference_pass(self) -> None:
        """Reference log-probs of the round's examples (computed, or read from the cache)."""
        s = self.s
        s.method.prepare(s.accelerator.device)
        with phase("reference pass") if s.method.needs_reference else contextlib.nullcontext():
            self.tables = reference_tables(s.method, s.model, Data(self.round_data, s.data.eval, s.data.report),
                                           s.accelerator, s.tokenizer, s.reference_adapter)

    def baseline(self, stop: StopRequest) -> None:
        """Before training the policy *is* the reference (LoRA's B starts at zero, or the policy is a copy of the
        start adapter), so its eval metrics are those of the reference model."""
        s = self.s
        if s.resume_from is None:
            s.state.baseline = self.held_out("evaluating the reference") if s.data.eval else {}
            s.state.baseline.update(self.sample(adapter=False))
            if "behaviour" in s.state.baseline:
                log(f"behaviour score of the reference model: {s.state.baseline['behaviour']:.3f}")
        elif self.sampler.prompts:
            self.sampler.reference_distinct = s.state.baseline.get("diversity/distinct_2")
        flag = torch.full((1,), float(bool(stop.requested)), dtype=torch.float64, device=s.accelerator.device)
        if reduce_sum(s.accelerator, flag).item():
            raise Interrupted(EARLY_STOP)  # (a stop raised at once where it landed; this is one off the main thread)

    def run_steps(self, stop: StopRequest) -> None:
        """The optimizer steps. One step = grad_accum micro-batches of batch_size examples on each process, the
        next `pairs_per_step` examples of the round's data stream; the step count locates it on resume."""
        s, t, state = self.s, self.s.recipe.train, self.s.state
        if s.main:
            self.metrics = MetricsLog(s.run.metrics)
        unit, pps = s.method.unit, s.pairs_per_step
        log(f"training: {len(self.round_data)} {unit}s, {s.total_steps} steps of {pps} {unit}s "
            f"({t.batch_size} x {t.grad_accum} x {s.world} process(es)){f', {t.rounds} rounds' if t.rounds > 1 else ''}"
            f", on {s.device}")
        bar = progress(total=s.total_steps, initial=state.step, disable=not s.main, unit="step", phase="training",
                       desc=s.recipe.stage if s.recipe.stage != "dpo" else s.recipe.loss.name)
        window, nonfinite_in_a_row = s.method.Stats.from_state(state.window), 0
        window_start, probe = time.perf_counter(), {}
        s.model.train()
        while state.step < s.total_steps:
            step_stats, grad_norm, finite, stopping = self.step(stop)
            state.step += 1
            state.pairs_seen += pps
            bar.update(1)
            if finite:
                window.merge(step_stats)
                nonfinite_in_a_row = 0
            else:
                state.skipped_steps += 1
                nonfinite_in_a_row += 1
                log(f"step {state.step}: non-finite loss or gradient norm; step skipped")
                if nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise diverged(state.step, state.skipped_steps, s.run.complete_checkpoints())
            if self.controller and state.step % s.recipe.loss.kl_every == 0:
                probe = self.steer_beta()
            if state.step % t.log_every == 0 or state.step == s.total_steps:
                row = self.train_row(window, grad_norm, probe, time.perf_counter() - window_start)
                if "loss" in row:
                    bar.set_postfix(_postfix(row), refresh=False)
                window, window_start, probe = s.method.Stats(), time.perf_counter(), {}
            round_end = state.step == s.ends[s.round_idx] and state.step < s.total_steps
            periodic_eval = t.eval_every and state.step % t.eval_every == 0 and state.step < s.total_steps
            if round_end or periodic_eval:
                self.log_row({**self.where(), "split": "eval", **self.evaluation()}, "eval/")
            if round_end:
                self.end_round()
            periodic = t.save_every and state.step % t.save_every == 0 and not nonfinite_in_a_row
            if periodic or stopping:  # (no periodic checkpoint in a NaN streak: keep the last good one)
                state.window = window.state()
                path = self.checkpoint()
                if stopping:
                    bar.close()
                    self.metrics.close()
                    raise Interrupted(f"stopped at step {state.step} on {stop.requested or 'a request to another process'}; "
                                      f"resume with: lora-dpo train {s.run.config} resume=true  ({path})")
        bar.close()

    def step(self, stop: StopRequest) -> tuple[Stats, torch.Tensor, bool, bool]:
        """One optimizer step: forward and backward over this process's micro-batches, clip, then apply it unless
        a loss or the gradient norm is non-finite on any process. Returns (the step's metrics summed over
        processes, the gradient norm, whether it was applied, whether a stop was requested anywhere)."""
        s, t = self.s, self.s.recipe.train
        position = (s.state.step - self.round_start) * s.pairs_per_step  # the step's place in this round's stream
        ctx = StepContext(beta=self.beta, device=s.device, step=s.state.step)
        stats, nonfinite = s.method.Stats(), torch.zeros((), dtype=torch.bool, device=home(s.device))
        for positions in step_micro_batches(self.stream, position, t.batch_size, t.grad_accum, s.rank, s.world):
            with s.accelerator.accumulate(s.model):
                items = [self.round_data[i] for i in positions]
                reference = self.tables.train[positions] if self.tables.train is not None else None
                with activation_offload(t.activation_offload, s.device):  # saved activations wait on the CPU
                    loss = s.method.loss(s.model, items, positions, reference, ctx, stats)
                nonfinite = nonfinite | ~torch.isfinite(loss).to(nonfinite.device)
                s.accelerator.backward(loss)
        # The last micro-batch synchronised the gradients: each is now the mean over the step's examples.
        assert s.accelerator.sync_gradients, "micro-batches out of step with accelerate's accumulation"
        clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = s.accelerator.clip_grad_norm_(clip_params(s.accelerator, s.model, s.params), clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else torch.as_tensor(grad_norm)  # (FSDP2: a DTensor)
        # One reduction per step: the metric sums, and whether any process saw a non-finite loss or gradient
        # norm, or was asked to stop; so every process skips, logs and stops alike.
        where = home(s.device)  # (the statistics' device: float64 sums)
        bad = (nonfinite | ~torch.isfinite(grad_norm.to(where))).to(torch.float64).reshape(1)
        requested = torch.full((1,), float(bool(stop.requested)), dtype=torch.float64, device=where)
        summed = reduce_sum(s.accelerator, torch.cat([stats.vector().to(where), bad, requested]))
        bad_steps, stops = summed[-2:].tolist()  # -- the step's one host-device sync: apply it or not --
        finite = bad_steps == 0
        if finite:  # a NaN/inf step is skipped: the adapter keeps its last good weights
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return s.method.Stats.from_vector(summed[:-2]), grad_norm, finite, stops > 0

    def steer_beta(self) -> dict:
        """Adaptive beta: measure the sampled KL (the processes' mean: every one then sets the same beta) and
        take the controller's next beta."""
        s = self.s
        kl = measure_kl(s.recipe, s.policy, s.tokenizer, [e.prompt for e in self.round_data], s.state.step)
        kl = reduce_sum(s.accelerator, torch.tensor([kl], dtype=torch.float64, device=s.device)).item() / s.world
        self.beta = self.controller.update(self.beta, kl)
        s.model.train()
        return {"kl/sampled": kl, "beta": self.beta}

    def train_row(self, window: Stats, grad_norm: torch.Tensor, probe: dict, elapsed: float) -> dict:
        """Log the window of steps since the last row (the metrics become Python numbers here, once)."""
        s = self.s
        row = {**self.where(), "split": "train"}
        pairs, tokens, means = window.report()  # -- a logged step: its syncs (the window, the norm, the peak) --
        if pairs:  # a window of skipped steps only has no numbers to report
            row.update(means, grad_norm=float(grad_norm))
        row.update(probe, lr=s.scheduler.get_last_lr()[0], pairs_per_s=pairs / elapsed, tokens_per_s=tokens / elapsed,
                   peak_memory_gb=max_over_processes(s.accelerator, peak_memory_gb(s.device)),
                   skipped_steps=s.state.skipped_steps)
        if self.controller:
            row["beta"] = self.beta
        self.log_row(row, "")
        if s.state.step % (10 * s.recipe.train.log_every) == 0 and s.main:
            self.refresh_plots()
        return row

    def log_row(self, row: dict, prefix: str) -> None:
        """A row to metrics.jsonl and the trackers; an eval row also redraws the plots."""
        self.metrics.write(row)
        self.s.accelerator.log({f"{prefix}{k}": v for k, v in _numeric(row).items()}, step=self.s.state.step)
        if prefix and self.s.main:
            self.refresh_plots()

    def held_out(self, name: str = "evaluation") -> dict:
        """The method's metrics on the held-out examples: batches split across processes, without gradients.
        `name`: the phase's, in the run's progress.json."""
        with phase(name):
            return self._held_out()

    def _held_out(self) -> dict:
        s = self.s
        s.model.eval()
        stats, table = s.method.Stats(), self.tables.eval
        ctx = StepContext(beta=self.beta, device=s.device, step=s.state.step)
        bs = s.recipe.eval.batch_size
        batches = list(shards(len(s.data.eval), bs, s.rank, s.world))
        with torch.no_grad():
            for idx, ghost in progress(batches, desc=f"evaluation ({len(s.data.eval)} held-out {s.method.unit}s)",
                                       unit="batch", disable=not s.main):
                items = [s.data.eval[i] for i in idx]
                s.method.evaluate(s.model, items, table[idx] if table is not None else None, ctx,
                                  s.method.Stats() if ghost else stats)
        return reduce_stats(s.accelerator, stats).means()

    def evaluation(self) -> dict:
        """Held-out metrics, then the sampled figures of the policy; leaves the model in train mode."""
        s = self.s
        row = self.held_out() if s.data.eval else {}
        row.update(self.sample(adapter=True))
        s.model.train()
        return row

    def sample(self, adapter: bool) -> dict:
        """The sampled figures of the policy (`adapter`) or of the reference (probes.Sampler), as a phase."""
        if not self.sampler.prompts:
            return {}
        with phase(f"sampling the {'policy' if adapter else 'reference'}"):
            return self.sampler(self.s.policy, adapter=adapter)

    def end_round(self) -> None:
        """Iterative DPO: the policy becomes the frozen reference of the next round."""
        s = self.s
        if s.main:
            with staged_dir(s.run.round(s.round_idx + 1)) as tmp:
                save_adapter(s.policy, s.tokenizer, tmp)
        s.accelerator.wait_for_everyone()
        snapshot_reference(s.policy)
        s.round_idx += 1
        s.reference_adapter = adapter_fingerprint(s.run.round(s.round_idx))
        self.stream = self._stream()
        self.reference_pass()
        s.model.train()
        log(f"round {s.round_idx + 1} of {s.recipe.train.rounds}: the policy of step {s.state.step} is the new reference "
            f"({s.run.round(s.round_idx)})")

    def checkpoint(self) -> Path:
        """All processes call this: their RNG states go to the main one, which writes the checkpoint."""
        s = self.s
        rngs = gather_object([rng_state()]) if s.world > 1 else None
        adapter = gathered_adapter(s.accelerator, s.model) if s.sharded else None
        s.state.beta = self.beta
        staged = None
        if s.sharded:  # every process writes its part of the optimizer state into the checkpoint before its rename
            if s.main:
                staging(s.run, s.state.step)
            s.accelerator.wait_for_everyone()
            staged = s.run.staging(s.state.step)
            save_sharded_optimizer(s.accelerator, s.model, s.optimizer, staged / SHARDED_OPTIMIZER)
            s.accelerator.wait_for_everyone()
        if s.main:
            with phase("saving a checkpoint", detail=f"step {s.state.step}"):
                save_checkpoint(s.run, s.state, lambda folder: write_adapter(s.policy, folder, adapter),
                                None if s.sharded else s.optimizer, s.scheduler, s.accelerator.scaler,
                                s.recipe.train.keep_last, rngs, staged)
        s.accelerator.wait_for_everyone()
        return s.run.checkpoint(s.state.step)

    def finish(self) -> dict:
        """The final evaluation, and the checkpoint of the last step."""
        s = self.s
        final = {"step": s.state.step, "split": "eval", f"{s.method.unit}s": len(s.data.eval),
                 "skipped_steps": s.state.skipped_steps}
        row = self.evaluation()
        if row:
            final.update(row)
            self.log_row({**self.where(), "split": "eval", **row}, "eval/")
        final["beta"] = self.beta  # the beta the run ended with (adaptive beta moves it): what compare uses
        final["baseline"] = s.state.baseline
        self.metrics.close()
        s.state.window = s.method.Stats().state()
        self.checkpoint()
        return final

    def refuse_non_finite(self, final: dict) -> None:
        """A final evaluation with a non-finite metric is an error, never "done": no adapter is written as the
        result, and the message names the newest checkpoint saved before the training metrics went non-finite."""
        bad = [k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v)]
        if not bad:
            return
        s = self.s
        rows = read_metrics(s.run.metrics) if s.run.metrics.is_file() else []
        broke = next((r["step"] for r in rows if r.get("split") == "train" and not all(
            math.isfinite(v) for v in _numeric(r).values())), s.state.step + 1)
        good = [c for c in s.run.complete_checkpoints() if s.run.step_of(c) < broke]
        where = (f"the newest checkpoint before the metrics went non-finite (step {broke}) is {good[-1]}: resume "
                 f"from it with resume={good[-1]} and a lower train.lr") if good else \
            "no checkpoint was saved before the metrics went non-finite; start again with a lower train.lr"
        raise UserError(f"the final evaluation is not finite ({', '.join(bad[:4])}): training diverged (a learning "
                        f"rate or beta too large, fp16 overflow, or rows that break the loss). No adapter was written "
                        f"to {s.run.adapter}; {where}")

    def write_result(self, final: dict) -> None:
        """The adapter, eval.json and the plots; every process returns once the run directory is complete."""
        s = self.s
        adapter = gathered_adapter(s.accelerator, s.model) if s.sharded else None
        if s.main:
            with phase("saving the adapter"), staged_dir(s.run.adapter) as tmp:
                save_adapter(s.policy, s.tokenizer, tmp, adapter)
            s.run.write_json(s.run.eval, final)
            self.refresh_plots()
            write_run_card(s.run)
            log(_summary(final, s.run))
        s.accelerator.wait_for_everyone()
        s.accelerator.end_training()  # (this also ends the process group)

    # -- where the loop stands
    @property
    def round_data(self) -> list:
        return self.s.rounds[self.s.round_idx]

    @property
    def round_start(self) -> int:
        return self.s.ends[self.s.round_idx - 1] if self.s.round_idx else 0

    def where(self) -> dict:
        s = self.s
        epoch = (s.state.step - self.round_start) * s.pairs_per_step / len(self.round_data)
        return {"step": s.state.step, "epoch": epoch} | ({"round": s.round_idx + 1} if s.recipe.train.rounds > 1 else {})

    def _stream(self) -> PairStream:
        s, t = self.s, self.s.recipe.train
        grouped = t.group_by_length and s.method.unit == "pair"  # (single completions are not regrouped)
        return training_stream(self.round_data, t.seed + s.round_idx, s.pairs_per_step, grouped, s.method.layout.shared)

    def refresh_plots(self) -> None:
        """Plots are a view of metrics.jsonl; failing to draw them (a full disk, say) must not end a run."""
        try:
            write_plots(self.s.run.path)
        except Exception as exc:  # noqa: BLE001 - any plotting failure is reported and training goes on
            log(f"warning: could not refresh plots in {self.s.run.plots}: {exc}")


def _postfix(row: dict) -> dict:
    keys = (("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".2f"), ("rewards/margins", "margin", ".3f"),
            ("ppl", "ppl", ".2f"), ("beta", "beta", ".3g"))
    return {short: f"{row[k]:{fmt}}" for k, short, fmt in keys if k in row}


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def write_run_card(run: RunDir) -> None:
    """The finished run's adapter/README.md: the model card an export writes (recipe, final evaluation against the
    reference, curves, how to load it), with its plots and recipe beside it, in place of peft's blank template, so
    the folder can be shared as it is. A card that cannot be written costs a warning, never the run."""
    try:
        src = resolve_source(run.path)
        write_card(run.adapter, src, "adapter", str(run.adapter), hub_model_id(src.base_name), title=run.path.name)
    except (OSError, ValueError, UserError) as exc:
        log(f"warning: the adapter's model card could not be written ({first_line(exc)}); `lora-dpo export "
            f"{run.path} --out DIR` writes one")


def _summary(final: dict, run: RunDir) -> str:
    parts = [f"done: {run.path}"]
    base = final.get("baseline", {})
    if "ppl" in final:
        parts.append(f"eval loss {base.get('loss', float('nan')):.3f} -> {final['loss']:.3f} (perplexity {final['ppl']:.2f})")
    if "rewards/accuracies" in final:
        parts.append(f"eval reward accuracy {final['rewards/accuracies']:.3f}, margin {final['rewards/margins']:.3f}")
    if "behaviour" in final:
        parts.append(f"behaviour {base.get('behaviour', float('nan')):.3f} -> {final['behaviour']:.3f}")
    return "; ".join(parts)
