"""Training methods behind one protocol (base.py): preference pairs with any paired loss (preference.py), KTO
(kto.py), SFT (sft.py), online DPO (online.py) with its judges (judges.py). `method_class` picks the recipe's."""

from ..config import Recipe
from ..core.losses import LOSSES
from .base import Data, Method, StepContext
from .kto import KTOMethod
from .online import OnlineMethod
from .preference import PreferenceMethod
from .sft import SFTMethod


def method_class(recipe: Recipe) -> type[Method]:
    """The method a recipe asks for: SFT (stage: sft), online DPO (online.enabled), or the method of its loss's
    kind (core/losses.py): pairs, or unpaired examples."""
    if recipe.stage == "sft":
        return SFTMethod
    if recipe.online.enabled:
        return OnlineMethod
    return PreferenceMethod if LOSSES[recipe.loss.name].paired else KTOMethod


__all__ = ["Data", "KTOMethod", "Method", "OnlineMethod", "PreferenceMethod", "SFTMethod", "StepContext",
           "method_class"]
