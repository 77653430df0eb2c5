"""`lora-dpo plan RECIPE --gpu-memory 8GB`: predict a recipe's peak GPU memory and propose settings that fit.

The memory model is memory/plan.py's; this command reads what it needs (the model's configuration, no weights;
the lengths of the recipe's training pairs) and prints the prediction and a proposal.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ..config import ModelConfig, Recipe, load_recipe
from ..data.order import pair_widths
from ..data.pairs import build_datasets
from ..errors import ConfigError, UserError, first_line
from ..memory.plan import (CONTEXT_BYTES, NO_GRAD, PHASES, GiB, Shape, Setting, checkpointed_layers, device_total,
                           estimate, fewest_checkpointed, overrides, parse_memory, peak_of, propose, shape_from_config,
                           worst_batch)
from ..model.checkpointing import auto_budget, cannot_predict
from ..model.layout import decide_layout, trains_pairs
from ..model.load import load_model_config, load_tokenizer


def data_widths(recipe: Recipe) -> tuple[list[tuple[int, int, int]] | None, str]:
    """Each training pair's widths (data/order.pair_widths), tokenised and truncated exactly as `train` would, and
    a line saying where the lengths come from. (None, why) when the data cannot be read or is not preference
    pairs."""
    if not trains_pairs(recipe) or recipe.online.enabled:
        return None, "lengths: every sequence at max_length (data lengths are read for offline preference pairs only)"
    try:
        pairs, _, _ = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.train.seed)
    except UserError as exc:
        return None, f"lengths: every sequence at max_length (the data was not read: {first_line(exc)})"
    return pair_widths(pairs), f"lengths: the {recipe.train.batch_size} widest of the {len(pairs)} training pairs in {recipe.data.train}"


def load_shape(model_cfg: ModelConfig, config=None) -> Shape:
    """The model's Shape from its configuration (`config`, or read alone: AutoConfig, a Hub id or a local folder)."""
    config = config or load_model_config(model_cfg)
    try:
        return shape_from_config(config)
    except (AttributeError, TypeError) as exc:
        raise ConfigError(f"model.name: '{model_cfg.name}' is not a decoder-only transformer the planner knows: "
                          f"{first_line(exc)}") from None


def plan(recipe, gpu_memory: int, lengths: str = "data") -> dict:
    """The prediction for the recipe as written and the proposal (None when nothing fits). lengths: `data` sizes
    the worst batch from the training pairs when they can be read, `max` at max_length."""
    config = load_model_config(recipe.model)
    shape = load_shape(recipe.model, config)
    widths, source = data_widths(recipe) if lengths == "data" else (None, "lengths: every sequence at max_length")
    setting = Setting.of(recipe, widths, decide_layout(recipe, config).shared)
    if setting.auto_checkpointing and cannot_predict(recipe, config) is None:
        # (on a live device auto reads the memory free beside the CUDA context)
        budget = auto_budget(gpu_memory - CONTEXT_BYTES)
        setting = replace(setting, checkpointed=fewest_checkpointed(shape, setting, budget))
    terms = estimate(shape, setting)
    allocated = peak_of(terms)
    chosen = propose(shape, setting, gpu_memory)
    rows, width, _ = worst_batch(setting)
    return {
        "shape": shape.__dict__, "gpu_memory": gpu_memory, "lengths": source, "worst_batch": [rows, width],
        "checkpointed_layers": checkpointed_layers(shape, setting), "auto_checkpointing": setting.auto_checkpointing,
        "terms": terms, "allocated": allocated,
        "device_total": device_total(allocated), "fits": device_total(allocated) <= gpu_memory,
        "proposal": None if chosen is None else overrides(setting, chosen),
        "proposal_total": None if chosen is None else device_total(peak_of(estimate(shape, chosen))),
    }


def format_plan(result: dict, recipe_path: str) -> str:
    gb = lambda b: f"{b / GiB:6.2f} GiB"
    sh = result["shape"]
    rows, width = result["worst_batch"]
    lines = [f"model: {sh['layers']} layers, hidden {sh['hidden']}, vocab {sh['vocab']}; "
             f"GPU memory {result['gpu_memory'] / GiB:.2f} GiB",
             f"{result['lengths']}: the worst batch is {rows} rows x {width} tokens",
             f"gradient checkpointing{' (auto: the fewest layers that fit)' if result['auto_checkpointing'] else ''}: "
             f"{result['checkpointed_layers']} of {sh['layers']} layers",
             "predicted peak (torch.cuda.max_memory_allocated):"]
    phased = set().union(*PHASES)
    note = lambda name: ("  (step phase: the larger counts)" if name in phased else
                         "  (no-grad pass at eval.batch_size: instead of a step)" if name == NO_GRAD else "")
    lines += [f"  {name:<28}{gb(v)}{note(name)}" for name, v in result["terms"].items()]
    lines += [f"  {'allocated peak':<28}{gb(result['allocated'])}",
              f"  {'+ CUDA context, slack':<28}{gb(result['device_total'] - result['allocated'])}",
              f"  {'device total':<28}{gb(result['device_total'])}  "
              f"{'fits' if result['fits'] else 'does not fit'}"]
    if result["proposal"] == []:
        lines.append("proposal: the recipe fits as it is")
    elif result["proposal"]:
        lines.append(f"proposal ({gb(result['proposal_total']).strip()} predicted): "
                     f"lora-dpo train {recipe_path} {' '.join(result['proposal'])}")
    lines.append("note: a model of memory, not a measurement (benchmarks/RESULTS.md has its checks against measured peaks)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    budget = parse_memory(args.gpu_memory)
    recipe = load_recipe(args.recipe, args.overrides)
    result = plan(recipe, budget, args.lengths)
    print(json.dumps(result, indent=2) if args.json else format_plan(result, args.recipe))
    if result["proposal"] is None:
        raise ConfigError(f"--gpu-memory: nothing fits in {budget / GiB:.2f} GiB, even at batch 1 with activation "
                          f"offload and max_length {max(64, recipe.data.max_length // 4)}; a smaller model or "
                          "a larger GPU is needed")
    return 0
