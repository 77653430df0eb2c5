"""Answers side by side: reference vs tuned, or adapter A vs B, each with its implicit reward (comparer.py), with
the sampling settings of settings.py. Names load on first use (lazy.py)."""

from ..lazy import lazy_names

_OWNERS = {
    "Adapter": ".comparer", "Comparer": ".comparer", "Row": ".comparer", "format_rows": ".comparer",
    "read_prompts": ".comparer", "Sampling": ".settings",
}  # fmt: skip
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_names(__name__, _OWNERS)
