"""lora-dpo: Direct Preference Optimization with a LoRA adapter on a 4-bit base model.

The Python API (README: "From Python"):

    import lora_dpo
    recipe = lora_dpo.load_recipe("recipes/toy.yaml", ["output_dir=runs/notebook"])
    result = lora_dpo.train(recipe, data=rows)   # rows: optional, a datasets.Dataset or a list of dicts

Names are loaded on first use (PEP 562), so `import lora_dpo` loads no torch, and the library never imports the
app or gradio.
"""

import logging
from typing import TYPE_CHECKING

from .lazy import lazy_names

__version__ = "0.1.0"

# bitsandbytes warns at import (which accelerate and peft trigger) that it cannot fetch an optional CPU
# kernel from the Hub and suggests `pip install kernels`; it then uses its own kernel. On an offline machine
# the advice is wrong and alarming, so only its errors are shown.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# public name -> the module that owns it
_API = {
    "train": "lora_dpo.api", "TrainResult": "lora_dpo.api", "preview_data": "lora_dpo.api",
    "Recipe": "lora_dpo.config", "ModelConfig": "lora_dpo.config", "LoraConfig": "lora_dpo.config",
    "DataConfig": "lora_dpo.config", "LossConfig": "lora_dpo.config", "TrainConfig": "lora_dpo.config",
    "EvalConfig": "lora_dpo.config", "OnlineConfig": "lora_dpo.config", "load_recipe": "lora_dpo.config",
    "save_recipe": "lora_dpo.config",
    "LOSSES": "lora_dpo.core.losses", "LossSpec": "lora_dpo.core.losses", "register_loss": "lora_dpo.core.losses",
    "RunDir": "lora_dpo.run", "resolve_source": "lora_dpo.run",
    "UserError": "lora_dpo.errors", "ConfigError": "lora_dpo.errors", "DataError": "lora_dpo.errors",
    "Interrupted": "lora_dpo.errors",
}  # fmt: skip
__all__ = [
    "ConfigError", "DataConfig", "DataError", "EvalConfig", "Interrupted", "LOSSES", "LoraConfig", "LossConfig",
    "LossSpec", "ModelConfig", "OnlineConfig", "Recipe", "RunDir", "TrainConfig", "TrainResult", "UserError",
    "load_recipe", "preview_data", "register_loss", "resolve_source", "save_recipe", "train",
]  # fmt: skip (the names of _API)


__getattr__, __dir__ = lazy_names(__name__, _API)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import TrainResult, preview_data, train
    from .config import (DataConfig, EvalConfig, LoraConfig, LossConfig, ModelConfig, OnlineConfig, Recipe,
                         TrainConfig, load_recipe, save_recipe)
    from .core.losses import LOSSES, LossSpec, register_loss
    from .errors import ConfigError, DataError, Interrupted, UserError
    from .run import RunDir, resolve_source
