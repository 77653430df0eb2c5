"""The one decision of how pairs are laid out in a batch (`train.shared_prompt`), made once per run.

The shared-prompt layout (core/logps.py) encodes each prompt once and gives the same log-probs as the plain
layout, within float rounding, where the attention takes a custom 4D mask (sdpa, eager) and no sliding window
can bind: the mask has no window, so a model whose window is shorter than max_length would see more context
than in the plain layout. `true` where it is not exact is an error naming the key; `auto` then falls back to
the plain layout and says why. SFT and KTO examples are one sequence each: the question does not arise.

The trainer decides once, from the model's configuration before the model loads (so that a `true` that cannot
hold fails early), and passes the `Layout` on to collate, forward, data order and the memory model; only if
transformers then runs an attention that takes no 4D mask (which the configuration cannot tell) is it decided
again, with that implementation. `lora-dpo plan` decides from the configuration alone.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from ..config import Recipe
from ..core.logps import MASK_ATTENTION
from ..core.losses import LOSSES
from ..errors import ConfigError


class Layout(NamedTuple):
    shared: bool  # pairs as [prompt | chosen | rejected] rows
    why_not: Optional[str] = None  # why `auto` chose the plain layout, for the run's log

    def notice(self) -> Optional[str]:
        return f"notice: train.shared_prompt=auto uses the plain layout: {self.why_not}" if self.why_not else None


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers (some or all) see only the last W tokens, else None."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def trains_pairs(recipe: Recipe) -> bool:
    """Whether the recipe's examples are preference pairs (the only examples with a layout to choose)."""
    return recipe.stage == "dpo" and LOSSES[recipe.loss.name].paired


def decide_layout(recipe: Recipe, model_config, implementation: str | None = None) -> Layout:
    """The layout of the recipe's pairs on a model with this configuration. `implementation`: the attention the
    loaded model runs (`config._attn_implementation`); None before it loads, when the recipe's
    model.attn_implementation is what will run (transformers' default, sdpa or eager, takes the mask)."""
    setting = recipe.train.shared_prompt
    if setting is False or not trains_pairs(recipe):
        return Layout(False)
    problems = []
    if implementation is not None and implementation not in MASK_ATTENTION:
        problems.append(f"attention '{implementation}' takes no custom 4D mask")
    elif implementation is None and recipe.model.attn_implementation not in (None, *MASK_ATTENTION):
        problems.append(f"model.attn_implementation={recipe.model.attn_implementation} takes no custom 4D mask")
    window = sliding_window(model_config)
    if window is not None and window < recipe.data.max_length:
        problems.append(f"the model attends through a sliding window of {window} tokens, shorter than "
                        f"data.max_length={recipe.data.max_length}, and the shared layout's mask has no window")
    if not problems:
        return Layout(True)
    if setting is True:
        raise ConfigError(f"train.shared_prompt: {'; '.join(problems)}; set train.shared_prompt=false (or auto)")
    return Layout(False, "; ".join(problems))
