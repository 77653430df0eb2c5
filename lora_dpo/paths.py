"""Where lora-dpo keeps what it builds or caches: one root, `$LORA_DPO_CACHE` or `~/.cache/lora_dpo`; the one way
anything is built there (under a file lock, into a temporary folder renamed into place); the recipes that ship
with the package."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

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


def lock_for(target: Path) -> Path:
    """The lock file of a cached folder: in the cache's `locks/` folder, not beside the folder it guards (a lock
    file stays when it is released, and must not be mistaken for a build)."""
    name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "locks" / f"{target.name}-{name}.lock"


def build_once(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """`target`, built by `build(folder)` the first time: under a file lock, so that one process builds and the
    others wait for it; into a temporary sibling renamed into place, so that a killed build never leaves a half-
    written folder; when a process without the lock finished first, its folder is kept."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_for(target), f"lora-dpo: waiting for another process to finish building {what} in {target} ..."):
        if target.exists():
            return target
        for stale in target.parent.glob(f".{target.name}.*"):  # temporaries of killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would otherwise become the cache's mode
            build(tmp)
            if not target.exists():
                try:
                    os.replace(tmp, target)  # atomic; fails if another process has put a non-empty folder there
                except OSError:
                    if not target.exists():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
