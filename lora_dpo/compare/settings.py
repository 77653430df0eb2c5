"""The sampling settings of a comparison, with their defaults: what `lora-dpo compare --help` shows before
anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.7  # 0 decodes greedily
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    max_new_tokens: int = 128  # tokens generated per answer
    seed: int = 0  # same seed, same answers; every pane samples from the same seed

    def check(self) -> None:
        for name, ok, want in (("temperature", 0 <= self.temperature <= 5, "between 0 and 5"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("max_new_tokens", 1 <= self.max_new_tokens <= 4096, "between 1 and 4096")):
            if not ok:
                raise UserError(f"{name}: must be {want}, got {getattr(self, name)}")
