"""Packages whose public names load on first use (PEP 562): importing the package imports nothing heavy, so the
command line's --help and the package's light modules start without torch. Used by lora_dpo/__init__.py and by
the subpackages that re-export heavy modules (export/, compare/)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, owners: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: `owners` maps each public name to the module that defines it (absolute,
    or relative to the package); a name is imported the first time it is read, then kept on the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in owners:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(owners[name], package), name)
        namespace[name] = value  # loaded once
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(owners))

    return __getattr__, __dir__
