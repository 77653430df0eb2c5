"""Training and evaluation metrics under the names TRL uses, and the metrics.jsonl file they go to.

Rewards are beta * (log pi_theta - log pi_ref) per sequence; accuracies are the share of pairs whose chosen
reward exceeds the rejected one (ties count as wrong, as in TRL); kl is the mean of log pi_theta - log
pi_ref per completion token over chosen and rejected responses.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


class PairStats:
    """Sums over pairs, so that means over micro-batches and eval batches weigh every pair equally."""

    # the per-pair sums `add` keeps, in a fixed order (processes reduce them as one vector)
    SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")

    def __init__(self):
        self.pairs = 0
        self.tokens = 0  # non-padding tokens processed (prompt + completions, both sequences)
        self._sums: dict[str, float] = {}
        self._kl_num = 0.0
        self._kl_den = 0.0

    def add(self, losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, kl_num, kl_den, tokens):
        """losses, rewards, policy log-probs: [B] tensors; kl_num: summed log-ratio over completion tokens;
        kl_den: their number."""
        b = losses.shape[0]
        self.pairs += b
        self.tokens += int(tokens)
        values = {
            "loss": losses.detach().float().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": policy_chosen.detach().float().sum(),
            "logps/rejected": policy_rejected.detach().float().sum(),
        }
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._kl_num += float(kl_num)
        self._kl_den += float(kl_den)

    def merge(self, other: "PairStats") -> None:
        self.pairs += other.pairs
        self.tokens += other.tokens
        for key, value in other._sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._kl_num += other._kl_num
        self._kl_den += other._kl_den

    def state(self) -> dict:
        """Plain numbers that `from_state` turns back into the same window (for checkpoints)."""
        return {"pairs": self.pairs, "tokens": self.tokens, "sums": dict(self._sums),
                "kl_num": self._kl_num, "kl_den": self._kl_den}

    @classmethod
    def from_state(cls, state: dict) -> "PairStats":
        stats = cls()
        if state:
            stats.pairs, stats.tokens, stats._sums = state["pairs"], state["tokens"], dict(state["sums"])
            stats._kl_num, stats._kl_den = state["kl_num"], state["kl_den"]
        return stats

    def means(self) -> dict[str, float]:
        out = {key: total / max(self.pairs, 1) for key, total in self._sums.items()}
        out["kl"] = self._kl_num / max(self._kl_den, 1.0)
        return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors on CUDA; peak resident memory of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / (1e9 if sys.platform == "darwin" else 1e6)


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`, flushed at once so a live reader (the app,
    `tail -f`) sees every row as soon as it exists."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _round(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a reader racing the writer) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
