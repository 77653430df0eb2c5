"""The toy world's preference data, written once into the cache (`$LORA_DPO_CACHE/toy`) by `paths.build_once`:
under a file lock, into a temporary folder renamed into place.

Processes that start together (the demo, `lora-dpo data`, the app, the workers of `accelerate launch`) wait
for one build and say what they wait for; a build killed half way leaves a temporary folder that the next
build, holding the lock, removes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..paths import build_once, cache_root
from ..progress import phase
from .world import WORLD_VERSION, make_pairs

TRAIN_PAIRS, TEST_PAIRS = 2000, 200
TRAIN_SEED, TEST_SEED = 0, 1  # the test split's prompts and reviews come from a differently seeded stream


def _write_data(folder: Path) -> None:
    print(f"lora_dpo.toy: writing the toy world's preference data into {folder.parent} ...", file=sys.stderr, flush=True)
    with phase("building the toy world", total=TRAIN_PAIRS + TEST_PAIRS, unit="pair") as built:
        for name, n, seed in (("train", TRAIN_PAIRS, TRAIN_SEED), ("test", TEST_PAIRS, TEST_SEED)):
            with open(folder / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in make_pairs(n, seed))
            built.advance(n)


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
