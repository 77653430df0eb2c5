"""Code a recipe names by `module:function` (eval.scorer, online.judge): imported, checked, or one clear error."""

from __future__ import annotations

import importlib
from typing import Callable

from ..errors import ConfigError, first_line

# specs of lora-dpo's own functions that moved, as recipes and run directories written before still name them
MOVED = {"lora_dpo.online:toy_quality": "lora_dpo.toy:toy_quality"}


def import_callable(spec: str, key: str, expected: str = "'module:function'") -> Callable:
    """`module:function` -> the function. A bad spec, a failed import or something not callable is one
    ConfigError naming the recipe `key` (and, for a bad spec, what `expected` it to be)."""
    module_name, sep, attr = MOVED.get(spec, spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: expected {expected}, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}: cannot import {spec!r}: {first_line(exc)}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn


def load_scorer(spec: str) -> Callable[[str], float]:
    """The recipe's `eval.scorer` (`module:function`, text -> float)."""
    return import_callable(spec, "eval.scorer")
