"""The toy world's preference data, written once into the cache (`$LORA_DPO_CACHE/toy`), and the one way
anything is built there: under a file lock, into a temporary folder renamed into place.

Processes that start together (the demo, `lora-dpo data`, the app, the workers of `accelerate launch`) wait
for one build and say what they wait for; a build killed half way leaves a temporary folder that the next
build, holding the lock, removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..paths import cache_root, locked
from .world import WORLD_VERSION, make_pairs

TRAIN_PAIRS, TEST_PAIRS = 2000, 200
TRAIN_SEED, TEST_SEED = 0, 1  # the test split's prompts and reviews come from a differently seeded stream


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
    with locked(lock_for(target), f"lora_dpo.toy: waiting for another process to finish building {what} in {target} ..."):
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


def _write_data(folder: Path) -> None:
    print(f"lora_dpo.toy: writing the toy world's preference data into {folder.parent} ...", file=sys.stderr, flush=True)
    for name, n, seed in (("train", TRAIN_PAIRS, TRAIN_SEED), ("test", TEST_PAIRS, TEST_SEED)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_pairs(n, seed))


def world_key() -> str:
    """The data's cache key: WORLD_VERSION plus a digest of the sources that make the data (world.py and this
    module), so that any change to the words, grammar or sizes invalidates cached data even if nobody bumps the
    version."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in ("world.py", "cache.py"))).hexdigest()[:10]
    return f"{WORLD_VERSION}-{digest}"


def toy_data_files() -> dict[str, str]:
    """{"train": path, "test": path} of standard-format jsonl preference pairs; written the first time."""
    folder = build_once(cache_root() / "toy" / f"data-{world_key()}", _write_data, "the toy world's data")
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
