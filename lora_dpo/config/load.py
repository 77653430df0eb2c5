"""Recipes from YAML: a file (and the recipes it names with `base:`), dotted `key=value` overrides, and the
resolved recipe written back. The checks themselves are the dataclasses' (config/recipe.py); this module adds
the one a YAML tree needs first: an unknown key, answered with the nearest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, check_utf8
from .names import FOREIGN_NAMES
from ..paths import shipped_recipe, shipped_recipes
from .recipe import ModelConfig, Recipe

def resolve_recipe(path: str | Path) -> Path:
    """A recipe file; a bare name (`toy`, `qwen2.5-1.5b-8gb`) that is not a file here is the shipped recipe."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_recipe(path)
    if shipped is not None:
        return shipped
    names = ", ".join(p.stem for p in shipped_recipes())
    raise ConfigError(f"recipe {path}: no such file, nor a shipped recipe of that name ({names}; lora-dpo recipes "
                      "lists them)")


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of a recipe, sections included ('lora', 'lora.r', ...)."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += recipe_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def _hint(key: str, prefix: str, fields: list[str]) -> str:
    """What an unknown key is here: the recipe key a TRL, LLaMA-Factory or torchtune name stands for; else the key
    of that name in another section; else the nearest key of this section, or of any."""
    if key in FOREIGN_NAMES:
        target, source = FOREIGN_NAMES[key]
        return f"; {key} ({source}) is {target} here"
    everywhere = recipe_keys()
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and k != prefix + key]
    if elsewhere:
        return f"; it is {' or '.join(elsewhere)}"
    # the nearest name in any section (this section's first when as near)
    score = lambda k: (difflib.SequenceMatcher(None, key, k.rsplit(".", 1)[-1]).ratio(), k.startswith(prefix))
    best = max(everywhere, key=score)
    return f"; did you mean '{best}'?" if score(best)[0] >= 0.6 else f"; valid keys: {', '.join(fields)}"


def _build(cls: type, values: Any, prefix: str) -> Any:
    """`cls` from a YAML mapping: unknown keys refused with the nearest valid key, sections built recursively;
    the dataclass checks every value as it is built."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key '{dotted}'{_hint(str(key), prefix, list(fields))}")
        tp = hints[key]
        kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.") if dataclasses.is_dataclass(tp) else value
    for key in fields:  # sections the recipe leaves out are still checked (required keys)
        if key not in kwargs and dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], {}, f"{prefix}{key}.")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.lr=1e-4", "data.train=x.json"]` -> `[("train.lr", 1e-4), ...]`; values parsed as YAML scalars."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, for example train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # (YAML 1.1 reads 1e-4 as a string: the field it goes to types it, recipe.coerce, so a string key keeps what
        # was written)
        out.append((key.strip(), value))
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_base(tree: dict, path: Path, seen: tuple = ()) -> dict:
    """`base: other.yaml` (relative to this recipe) makes the recipe a set of changes to another one: its keys
    are merged over the base's, section by section."""
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base: expected the path of another recipe, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"recipe {path}: base: {base} includes itself")
    if not base_path.is_file():
        raise ConfigError(f"recipe {path}: base: no such file {base_path}")
    return _merge(_with_base(read_yaml(base_path), base_path, seen + (path.resolve(),)), tree)


def read_yaml(path: Path) -> dict:
    """A recipe file's top-level mapping as YAML reads it (values are typed by the key they go to: recipe.coerce);
    ConfigError naming the file."""
    check_utf8(path, f"recipe {path}", ConfigError)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys at the top level")
    return loaded


def load_recipe(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply dotted overrides, validate, return a `Recipe`."""
    tree: dict = copy.deepcopy(base or {})  # overrides write into nested dicts: never into the caller's
    if path is not None:
        path = resolve_recipe(path)
        tree = _with_base(read_yaml(path), path)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(Recipe, tree, "")


def model_config(section: dict) -> ModelConfig:
    """A recipe's `model` section (e.g. a run's config.yaml) as a validated ModelConfig; unknown keys (from
    another version) are ignored."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return _build(ModelConfig, {k: v for k, v in section.items() if k in known}, "model.")


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested recipe -> {"train.lr": ...} with values trackers accept (lists become strings)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
