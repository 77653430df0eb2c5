"""Where lora-dpo keeps what it builds or caches: one root, `$LORA_DPO_CACHE` or `~/.cache/lora_dpo`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout


def cache_root() -> Path:
    """$LORA_DPO_CACHE, or ~/.cache/lora_dpo."""
    return Path(os.environ.get("LORA_DPO_CACHE") or Path.home() / ".cache" / "lora_dpo")


@contextlib.contextmanager
def locked(lock_file: Path, waiting: str) -> Iterator[None]:
    """Hold the file lock `lock_file` for the block. When another process holds it, say `waiting` (what this one
    waits for) on stderr, then wait: processes that start together build a shared cache once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(waiting, file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


RECIPES = Path(__file__).resolve().parent / "recipes"  # the recipes that ship inside the package


def shipped_recipes() -> list[Path]:
    """The recipes that ship with lora-dpo, toy first (the accelerate launch configs beside them are not recipes)."""
    return sorted(RECIPES.glob("*.yaml"), key=lambda p: (p.stem != "toy", p.stem))


def shipped_recipe(name: str | Path) -> Path | None:
    """The shipped recipe a bare name (`toy`, `qwen2.5-1.5b-8gb`) stands for, or None when `name` is a path."""
    name = Path(name)
    shipped = RECIPES / f"{name.name}.yaml"
    if name.parent == Path(".") and name.suffix not in (".yaml", ".yml") and shipped.is_file():
        return shipped
    return None
