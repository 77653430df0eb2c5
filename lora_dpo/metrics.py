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


class Stats:
    """Sums over examples (and numerator/denominator parts of per-token ratios), so that means over
    micro-batches, logging windows, eval batches and processes weigh every example equally.

    Subclasses name their per-example sums (SUMMED, reported as means over examples) and their ratios (RATIOS,
    reported as numerator / denominator, e.g. per completion token). `pairs` counts the examples added: pairs
    for the preference objectives, single completions for SFT and KTO."""

    SUMMED: tuple[str, ...] = ()
    RATIOS: tuple[str, ...] = ()

    def __init__(self):
        self.pairs = 0
        self.tokens = 0  # non-padding tokens processed (prompts and completions)
        self._sums: dict[str, float] = {}
        self._num: dict[str, float] = {}
        self._den: dict[str, float] = {}

    def add_sums(self, n: int, tokens, sums: dict, ratios: dict | None = None) -> None:
        """n examples; `sums`: name -> summed value over them (tensor or float); `ratios`: name -> (num, den)."""
        self.pairs += int(n)
        self.tokens += int(tokens)
        for key, value in sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        for key, (num, den) in (ratios or {}).items():
            self._num[key] = self._num.get(key, 0.0) + float(num)
            self._den[key] = self._den.get(key, 0.0) + float(den)

    def merge(self, other: "Stats") -> None:
        self.add_sums(other.pairs, other.tokens, other._sums, {k: (other._num[k], other._den[k]) for k in other._num})

    def state(self) -> dict:
        """Plain numbers that `from_state` turns back into the same window (for checkpoints)."""
        return {"pairs": self.pairs, "tokens": self.tokens, "sums": dict(self._sums), "num": dict(self._num),
                "den": dict(self._den)}

    @classmethod
    def from_state(cls, state: dict) -> "Stats":
        stats = cls()
        if state:
            stats.pairs, stats.tokens, stats._sums = state["pairs"], state["tokens"], dict(state["sums"])
            stats._num, stats._den = dict(state.get("num", {})), dict(state.get("den", {}))
            if "kl_num" in state:  # a checkpoint written before ratios were general
                stats._num["kl"], stats._den["kl"] = state["kl_num"], state["kl_den"]
        return stats

    def vector(self) -> list[float]:
        """Every number in a fixed order, for one all-reduce across processes (`from_vector` inverts it)."""
        return ([float(self.pairs), float(self.tokens)] + [self._sums.get(k, 0.0) for k in self.SUMMED]
                + [v for k in self.RATIOS for v in (self._num.get(k, 0.0), self._den.get(k, 0.0))])

    @classmethod
    def from_vector(cls, values: list[float]) -> "Stats":
        n = len(cls.SUMMED)
        pairs, tokens, sums, parts = values[0], values[1], values[2 : 2 + n], values[2 + n :]
        stats = cls()
        stats.pairs, stats.tokens = round(pairs), round(tokens)
        if any(values):  # (a step of online DPO where every prompt tied has no pairs but has its judge's figures)
            stats._sums = dict(zip(cls.SUMMED, sums))
            stats._num = {k: parts[2 * i] for i, k in enumerate(cls.RATIOS)}
            stats._den = {k: parts[2 * i + 1] for i, k in enumerate(cls.RATIOS)}
        return stats

    def means(self) -> dict[str, float]:
        out = {key: total / max(self.pairs, 1) for key, total in self._sums.items()}
        out.update({key: self._num[key] / self._den[key] for key in self._num if self._den[key]})
        return out


class PairStats(Stats):
    """Preference pairs: rewards, margins, accuracies, policy log-probs, and kl per completion token."""

    SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")
    RATIOS = ("kl",)

    def add(self, losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, kl_num, kl_den, tokens):
        """losses, rewards, policy log-probs: [B] tensors; kl_num: summed log-ratio over completion tokens;
        kl_den: their number."""
        self.add_sums(losses.shape[0], tokens, {
            "loss": losses.detach().float().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": policy_chosen.detach().float().sum(),
            "logps/rejected": policy_rejected.detach().float().sum(),
        }, {"kl": (kl_num, kl_den)})


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
