"""Training and evaluation statistics under the names TRL uses, kept on the device until they are logged.

Rewards are beta * (log pi_theta - log pi_ref) per sequence; accuracies are the share of pairs whose chosen
reward exceeds the rejected one (ties count as wrong, as in TRL); kl is the mean of log pi_theta - log pi_ref
per completion token over chosen and rejected responses.

A `Stats` is one float64 vector on the device of the tensors added to it: the example count, the token count,
one sum per SUMMED name and a (numerator, denominator) per RATIOS name. Adding a micro-batch's figures is a few
device kernels and no host-device sync; the vector is summed over processes as it is (one all-reduce), and
becomes Python numbers only in `means()` and `state()`, which the trainer calls at a logged step and at a
checkpoint. float64 sums of float32 values in the same order are the same numbers Python floats would give.
"""

from __future__ import annotations

import functools
import math

import torch


def home(device: torch.device | str) -> torch.device:
    """Where statistics of tensors on `device` accumulate: that device, but the CPU for one without float64
    (Apple's MPS)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _on(value, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor on `device`: a tensor converted there, a Python number filled there (a fill kernel,
    not a host-to-device copy, so nothing waits for the device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


class Stats:
    """Sums over examples (and numerator/denominator parts of per-token ratios), so that means over
    micro-batches, logging windows, eval batches and processes weigh every example equally.

    Subclasses name their per-example sums (SUMMED, reported as means over examples) and their ratios (RATIOS,
    reported as numerator / denominator, e.g. per completion token). `pairs` counts the examples added: pairs
    for the preference methods, single completions for SFT and KTO."""

    SUMMED: tuple[str, ...] = ()
    RATIOS: tuple[str, ...] = ()

    def __init__(self):
        self._v: torch.Tensor | None = None  # [2 + S + 2R] float64: examples, tokens, sums, (num, den) per ratio

    @classmethod
    def _width(cls) -> int:
        return 2 + len(cls.SUMMED) + 2 * len(cls.RATIOS)

    def _add(self, v: torch.Tensor) -> None:
        if self._v is None:
            self._v = v.clone()
            return
        if self._v.device != v.device:  # figures given as plain numbers first (on the CPU), device tensors later
            device = v.device if self._v.device.type == "cpu" else self._v.device
            self._v, v = self._v.to(device), v.to(device)
        self._v += v

    def add_sums(self, n, tokens, sums: dict, ratios: dict | None = None) -> None:
        """n examples; `sums`: name -> summed value over them (tensor or number); `ratios`: name -> (num, den).
        Names the class does not list are an error (a metric would be silently dropped)."""
        ratios = ratios or {}
        unknown = (set(sums) - set(self.SUMMED)) | (set(ratios) - set(self.RATIOS))
        if unknown:
            raise KeyError(f"{type(self).__name__} has no metric {', '.join(sorted(unknown))}")
        values = [n, tokens, *sums.values(), *(x for pair in ratios.values() for x in pair)]
        device = home(next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu")))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        slots = [_on(n, device), _on(tokens, device)]
        slots += [_on(sums[k], device) if k in sums else zero for k in self.SUMMED]
        for k in self.RATIOS:
            slots += [_on(ratios[k][0], device), _on(ratios[k][1], device)] if k in ratios else [zero, zero]
        self._add(torch.stack(slots))

    def merge(self, other: "Stats") -> None:
        if other._v is not None:
            self._add(other._v)

    def vector(self) -> torch.Tensor:
        """Every number in a fixed order, one tensor for one all-reduce across processes (`from_vector`
        inverts it)."""
        return self._v if self._v is not None else torch.zeros(self._width(), dtype=torch.float64)

    @classmethod
    def from_vector(cls, vector) -> "Stats":
        """The stats of a `vector()` (a tensor, or its numbers in a sequence)."""
        stats = cls()
        stats._v = vector if isinstance(vector, torch.Tensor) else torch.tensor([float(v) for v in vector],
                                                                                dtype=torch.float64)
        return stats

    def numbers(self) -> list[float]:
        """The vector as Python numbers: a host-device sync, for a logged step or a checkpoint."""
        return self._v.tolist() if self._v is not None else [0.0] * self._width()

    @property
    def pairs(self) -> int:
        return round(self.numbers()[0])

    def report(self) -> tuple[int, float, dict[str, float]]:
        """(examples, tokens, the figures to log), in one host-device sync: call it at a logged step."""
        if self._v is None:
            return 0, 0.0, {}
        values = self.numbers()
        pairs, n = round(values[0]), len(self.SUMMED)
        out = {key: total / max(pairs, 1) for key, total in zip(self.SUMMED, values[2 : 2 + n])}
        parts = values[2 + n :]
        out.update({key: parts[2 * i] / parts[2 * i + 1] for i, key in enumerate(self.RATIOS) if parts[2 * i + 1]})
        return pairs, values[1], self._derived(out)

    def _derived(self, out: dict[str, float]) -> dict[str, float]:
        """Figures computed from the others (a subclass's margins or perplexity)."""
        return out

    def means(self) -> dict[str, float]:
        """The figures to log (a sync: call it at a logged step)."""
        return self.report()[2]

    def state(self) -> dict:
        """Plain numbers that `from_state` turns back into the same window (for checkpoints)."""
        if self._v is None:
            return {"pairs": 0, "tokens": 0, "sums": {}, "num": {}, "den": {}}
        values = self.numbers()
        n = len(self.SUMMED)
        parts = values[2 + n :]
        return {"pairs": round(values[0]), "tokens": round(values[1]), "sums": dict(zip(self.SUMMED, values[2 : 2 + n])),
                "num": {k: parts[2 * i] for i, k in enumerate(self.RATIOS)},
                "den": {k: parts[2 * i + 1] for i, k in enumerate(self.RATIOS)}}

    @classmethod
    def from_state(cls, state: dict) -> "Stats":
        stats = cls()
        if state and (state.get("pairs") or state.get("sums") or state.get("num") or "kl_num" in state):
            num, den = dict(state.get("num", {})), dict(state.get("den", {}))
            if "kl_num" in state:  # a checkpoint written before ratios were general
                num["kl"], den["kl"] = state["kl_num"], state["kl_den"]
            sums = state["sums"]
            values = ([state["pairs"], state["tokens"]] + [sums.get(k, 0.0) for k in cls.SUMMED]
                      + [v for k in cls.RATIOS for v in (num.get(k, 0.0), den.get(k, 0.0))])
            stats._v = torch.tensor(values, dtype=torch.float64)
        return stats


def _rewards(prefix: str, chosen, rejected) -> dict:
    return {f"{prefix}/chosen": chosen.sum(), f"{prefix}/rejected": rejected.sum(),
            f"{prefix}/margins": (chosen - rejected).sum(), f"{prefix}/accuracies": (chosen > rejected).float().sum()}


PER_TOKEN = ("rewards_per_token/chosen", "rewards_per_token/rejected", "rewards_per_token/margins",
             "rewards_per_token/accuracies")


class PairStats(Stats):
    """Preference pairs: rewards, margins, accuracies, policy log-probs, and kl per completion token.

    `rewards/*` are TRL's, for every loss with a reference: beta times the log-ratio summed over the completion.
    A loss on mean log-probs per token (IPO, length-normalised DPO) is also given the rewards it optimises, beta
    times the per-token mean log-ratio, as `rewards_per_token/*` (the `per_token` class)."""

    SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")
    RATIOS = ("kl",)

    @classmethod
    def per_token(cls) -> type["PairStats"]:
        """This class with the `rewards_per_token/*` figures too."""
        return _per_token(cls)

    def add(self, losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, kl_num, kl_den, tokens,
            per_token: tuple | None = None):
        """losses, rewards, policy log-probs: [B] tensors; kl_num: summed log-ratio over completion tokens;
        kl_den: their number; `per_token`: (chosen, rejected) per-token rewards, for a `per_token()` class."""
        sums = {"loss": losses.detach().float().sum(), **_rewards("rewards", chosen_rewards, rejected_rewards),
                "logps/chosen": policy_chosen.detach().float().sum(),
                "logps/rejected": policy_rejected.detach().float().sum()}
        if per_token is not None:
            sums.update(_rewards("rewards_per_token", *per_token))
        self.add_sums(losses.shape[0], tokens, sums, {"kl": (kl_num, kl_den)})


@functools.cache
def _per_token(cls: type) -> type:
    return type(f"{cls.__name__}PerToken", (cls,), {"SUMMED": cls.SUMMED + PER_TOKEN, "__module__": cls.__module__})


class KTOStats(Stats):
    """Unpaired examples: rewards and log-probs averaged over the desirable (chosen) and undesirable (rejected)
    examples separately, and the KL reference point z0 averaged over examples."""

    SUMMED = ("loss",)
    RATIOS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")

    def _derived(self, out: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class SFTStats(Stats):
    """Supervised fine-tuning: the loss is the mean negative log-likelihood per response token."""

    RATIOS = ("loss",)

    def _derived(self, out: dict[str, float]) -> dict[str, float]:
        if "loss" in out:
            out["ppl"] = math.exp(min(out["loss"], 50.0))  # perplexity of the responses
        return out


class OnlineStats(PairStats):
    """PairStats of the pairs trained on, plus the judge's view of every sample: its mean score, and the share
    of prompts that gave no pair (all samples scored alike, or identical)."""

    RATIOS = ("kl", "online/score", "online/no_pair")
