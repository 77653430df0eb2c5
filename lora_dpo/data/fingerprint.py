"""Digests of encoded data: equal digests, equal token ids (run_info.json's record; the reference cache's key)."""

from __future__ import annotations

import hashlib
import json


def data_fingerprint(items, tokenizer_name: str) -> str:
    """sha256 of the tokenised examples (pairs, or single completions with their labels) and the tokenizer:
    equal fingerprints, equal training data."""
    h = hashlib.sha256(tokenizer_name.encode())
    for p in items:
        if hasattr(p, "chosen_ids"):
            h.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
        else:
            h.update(json.dumps([p.index, p.prompt_ids, p.completion_ids, p.desirable]).encode())
    return h.hexdigest()


def pair_ids_digest(pairs) -> str:
    """Digest of the pairs' token ids, in order (row i of a reference table belongs to pairs[i])."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()
