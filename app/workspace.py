"""The folders the app may read and write, and the check every typed path goes through.

A path typed into the app resolves inside one of the workspace's folders (recipes, runs, data, exports),
symlinks followed, or it is refused: the app may be shared on a network, and a text box is not a shell.
Model and dataset names that are not paths (`toy`, a Hub id such as `Qwen/Qwen2.5-1.5B-Instruct`) pass.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_dpo.config.load import recipe_keys
from lora_dpo.data.sources import looks_like_path
from lora_dpo.errors import UserError
from lora_dpo.paths import RECIPES, shipped_recipes
from lora_dpo.run import RunDir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Workspace:
    root: Path  # relative paths typed into the app are relative to this folder
    recipes: Path
    runs: Path
    data: Path
    exports: Path

    @classmethod
    def at(cls, root: str | Path, recipes=None, runs=None, data=None, exports=None) -> "Workspace":
        root = Path(root).expanduser().resolve()
        folder = lambda given, name: (root / Path(given).expanduser() if given else root / name).resolve()  # noqa: E731
        ws = cls(root, folder(recipes, "recipes"), folder(runs, "runs"), folder(data, "data"), folder(exports, "exports"))
        for path in (ws.runs, ws.exports):
            path.mkdir(parents=True, exist_ok=True)
        return ws

    def folders(self, *kinds: str) -> list[Path]:
        return [getattr(self, k) for k in kinds]

    def resolve(self, text: str, *kinds: str, what: str = "path", inside: bool = False) -> Path:
        """`text` as an absolute path inside one of the folders `kinds` ('recipes', 'runs', 'data',
        'exports'), symlinks followed; anything else raises UserError naming the field and the allowed
        folders. `inside`: strictly below the folder, never the folder itself (for what may be replaced)."""
        text = (text or "").strip()
        if not text:
            raise UserError(f"{what}: empty")
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        allowed = self.folders(*kinds)
        if not any((path == folder and not inside) or folder in path.parents for folder in allowed):
            names = ", ".join(self.show(f) + "/" for f in allowed)
            where = "a folder inside" if inside else "inside"
            raise UserError(f"{what}: {text} is not {where} the app's folders ({names}); refused")
        return path

    def is_path_like(self, text: str) -> bool:
        """A name that means a file or folder (rather than `toy` or a Hub id): the data loader's rule, or
        anything that exists in the workspace."""
        text = text.strip()
        return looks_like_path(text) or not HUB_ID.match(text) or (self.root / text).exists()

    def check_name_or_path(self, text: str, *kinds: str, what: str) -> str:
        """A model or dataset field: `toy` or a Hub id pass unchanged; a path must lie inside `kinds`."""
        if text.strip() == "toy" or not self.is_path_like(text):
            return text.strip()
        return str(self.resolve(text, *kinds, what=what))

    def show(self, path: Path) -> str:
        """A path as the user reads it: relative to the workspace root when inside it."""
        try:
            return str(Path(path).resolve().relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def add_shipped_recipes(self) -> int:
        """A workspace without a recipes/ folder gets a copy of the recipes that ship with lora-dpo (to edit
        there); returns how many were copied (0 when the folder exists: nothing of the user's is touched)."""
        if self.recipes.exists():
            return 0
        shutil.copytree(RECIPES, self.recipes, ignore=shutil.ignore_patterns("__pycache__", "uploads"))
        return len(shipped_recipes())

    def _yaml_files(self) -> list[Path]:
        return sorted(self.recipes.rglob("*.yaml")) if self.recipes.is_dir() else []

    def _classified(self) -> list[tuple[str, str | None]]:
        """(file, why it is not a recipe, or None) for every YAML file under recipes/, each read once."""
        return [(self.show(p), not_a_recipe(p)) for p in self._yaml_files()]

    def recipe_files(self) -> list[str]:
        """The recipes under recipes/: YAML mappings of recipe keys (complete or not; the form says what is
        missing). Other YAML files there, such as accelerate's launch configs, are not offered (`not_recipes`)."""
        return [f for f, why in self._classified() if why is None]

    def not_recipes(self) -> list[tuple[str, str]]:
        """(file, why) for the YAML files under recipes/ that are not recipes."""
        return [(f, why) for f, why in self._classified() if why is not None]

    def finished_runs(self) -> list[str]:
        """Run directories (any depth under runs/) with a final adapter."""
        found = (p.parent for p in self.runs.rglob(RunDir.CONFIG))
        return sorted({self.show(p) for p in found if (RunDir(p).adapter / "adapter_config.json").is_file()})


def not_a_recipe(path: Path) -> str | None:
    """Why the YAML file at `path` is not a recipe, in a few words; None when it is one (a mapping whose keys are
    the recipe's sections and top-level keys, or `base:`)."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "not readable as YAML"
    if not isinstance(tree, dict):
        return "not a mapping of keys"
    if "distributed_type" in tree or "compute_environment" in tree:
        return "an accelerate launch config: accelerate launch --config_file …"
    unknown = sorted(str(k) for k in tree if k not in TOP_KEYS)
    return f"keys that are not recipe keys: {', '.join(unknown[:3])}" if unknown else None


TOP_KEYS = {key for key in recipe_keys() if "." not in key} | {"base"}
