"""Code a recipe names by `module:function` (eval.scorer, online.judge): imported, checked, or one clear error."""

from __future__ import annotations

import importlib
import math
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


SAMPLE_TEXT = "A short sample reply."  # what user code is tried on before any model loads


def try_once(fn: Callable, args: tuple, key: str, spec: str, signature: str) -> object:
    """Call user code once on a tiny input before any model loads, so a wrong signature or a crash is a recipe error
    naming `key` (and the signature it must have), not a traceback after minutes of training."""
    try:
        return fn(*args)
    except Exception as exc:
        raise ConfigError(f"{key}: {spec} failed when tried on a sample ({first_line(exc)}); it must be "
                          f"{signature}") from None


def load_scorer(spec: str) -> Callable[[str], float]:
    """The recipe's `eval.scorer` (`module:function`, text -> float), tried once on a sample text."""
    fn = import_callable(spec, "eval.scorer")
    value = try_once(fn, (SAMPLE_TEXT,), "eval.scorer", spec, "a function of one text returning a number")
    value = value.item() if hasattr(value, "item") else value  # a 0-d tensor or numpy number
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"eval.scorer: {spec} must return a finite number for a text, returned {value!r}")
    return fn
