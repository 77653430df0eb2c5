"""Where lora-dpo keeps what it builds or caches: one root, `$LORA_DPO_CACHE` or `~/.cache/lora_dpo`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LORA_DPO_CACHE, or ~/.cache/lora_dpo."""
    return Path(os.environ.get("LORA_DPO_CACHE") or Path.home() / ".cache" / "lora_dpo")
