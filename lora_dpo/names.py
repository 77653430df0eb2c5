"""Names that stand for something lora-dpo builds itself, such as `toy`: a data source (data.train: toy), a model
(model.name: toy), an online judge (online.judge: toy). The module that builds the thing registers its name
here, at the bottom of the layers, so the layers that look names up never import it.

Who imports that module? Installed plugins declare themselves in the entry-point group `lora_dpo.plugins`
(pyproject.toml; the toy world is one), and the first lookup of a name imports them all, once: a name works
wherever it is used (the command line, the Python API, the app, a test) with nothing imported first.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Optional

PLUGINS = "lora_dpo.plugins"  # entry-point group: modules that register names when imported
KINDS = ("data", "model", "judge")
# kind -> name -> provider: data: () -> {split: local json file}; model: () -> model folder; judge: () -> Judge
REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_plugins_loaded = False


def register(kind: str, name: str, provider: Callable) -> None:
    """Make `name` stand for what `provider()` returns (built on first use if need be) wherever a `kind` is
    named: data (data.train, data.eval), model (model.name) or judge (online.judge)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    REGISTRY[kind][name] = provider


def load_plugins() -> None:
    """Import every installed plugin once (they register their names as they are imported)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=PLUGINS):
        entry.load()


def lookup(kind: str, name: str) -> Optional[Callable]:
    """The provider registered for `name` as a `kind`, or None: then the name is a path or a Hub id."""
    load_plugins()
    return REGISTRY[kind].get(name)


def registered(name: str) -> bool:
    """Whether `name` stands for something of any kind (so it is neither a Hub id nor a path)."""
    load_plugins()
    return any(name in names for names in REGISTRY.values())
