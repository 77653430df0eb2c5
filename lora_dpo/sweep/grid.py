"""A sweep's grid: `--grid loss.beta=0.05,0.1,0.2 --grid train.lr=1e-4,5e-4` is every combination of the values,
each one a run named by what it sets (`beta-0.05_lr-0.0001`), checked as a recipe before anything runs."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ..config.load import parse_overrides, recipe_keys
from ..errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")  # what a folder name keeps of a value


@dataclass(frozen=True)
class Grid:
    axes: tuple[tuple[str, tuple], ...]  # (recipe key, its values), in the order given

    def points(self) -> list[tuple[str, list[str]]]:
        """(name, KEY=VALUE overrides) of every combination, the first axis slowest."""
        out = []
        for combo in itertools.product(*(values for _, values in self.axes)):
            pairs = [(key, value) for (key, _), value in zip(self.axes, combo)]
            name = "_".join(f"{_short(key, self.axes)}-{_UNSAFE.sub('_', _text(value))}" for key, value in pairs)
            out.append((name, [f"{key}={_text(value)}" for key, value in pairs]))
        return out

    def as_dict(self) -> dict:
        return {key: list(values) for key, values in self.axes}


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _short(key: str, axes) -> str:
    """A key's last part names it in a point's folder, unless two axes share it (then the whole key)."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k, _ in axes) == 1 else key


def parse_grid(specs: list[str]) -> Grid:
    """`["loss.beta=0.05,0.1,0.2", ...]` -> Grid. ConfigError naming the --grid at fault: no KEY=, an unknown key,
    a key given twice, fewer than one value, a value repeated."""
    if not specs:
        raise ConfigError("--grid: give at least one, e.g. --grid loss.beta=0.05,0.1,0.2,0.5")
    keys = set(recipe_keys())
    axes = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {spec}: expected KEY=V1,V2,..., for example loss.beta=0.05,0.1,0.2")
        if key not in keys or "." not in key:
            raise ConfigError(f"--grid {spec}: {key} is not a recipe key (lora-dpo's keys are section.key, e.g. "
                              "loss.beta, train.lr, loss.name)")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"--grid {spec}: {key} is given twice; put all its values in one --grid")
        values = tuple(value for _, value in parse_overrides([f"{key}={v.strip()}" for v in raw.split(",")]))
        if len(set(map(_text, values))) != len(values):
            raise ConfigError(f"--grid {spec}: a value is repeated")
        axes.append((key, values))
    return Grid(tuple(axes))
