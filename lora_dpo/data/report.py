"""The data report: what a dataset holds before it trains anything.

Rows read, formats, malformed rows by reason, pairs dropped or truncated for length, token-length
percentiles, the length bias between chosen and rejected responses, and exact duplicates. `lora-dpo data`
prints `format()`; every training run prints `summary()` and writes `to_dict()` to data_report.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
from dataclasses import dataclass, field
from typing import NamedTuple, Optional


@dataclass
class DataReport:
    """What happened to the data.

    The counts (rows_read ... truncated_pairs) cover every row read: training rows and an eval split or file
    alike. The profile (lengths, the length-bias shares, duplicates) describes the *training source* only:
    the valid rows read from data.train (its data.train_split, after data.max_rows), before the eval_fraction
    hold-out, so it includes the pairs later held out for eval and the pairs dropped for length, and
    excludes the rows of a separate data.eval split or file. A valid row is one that is not malformed.
    Token counts are those of the tokenised pair before truncation: the rendered prompt (chat template and
    generation prompt included) and each completion with its one EOS.
    """

    source: str  # data.train
    rows_read: int
    formats: dict[str, int]  # format -> rows
    malformed: dict[str, int]  # reason -> rows skipped (on_bad_rows=skip; with error they raise instead)
    dropped_for_length: int  # pairs that could not fit max_length, or whose difference was cut off
    truncated_prompts: int
    truncated_completions: int  # chosen and rejected counted separately
    train_pairs: int
    eval_pairs: int
    max_length: Optional[int] = None
    max_prompt_length: Optional[int] = None
    eval_from: str = ""  # where the eval pairs came from, in words; their rows are counted above too
    truncated_pairs: int = 0  # kept pairs with a cut prompt or a cut completion (each pair counted once)
    # --- profile of the training source (see the class docstring for which rows count)
    stats_rows: int = 0  # valid rows of the training source that the figures below describe
    # "prompt", "chosen", "rejected", and "sequence" (prompt + the longer completion: what max_length bounds)
    # -> {"p50", "p90", "p99", "max": nearest-rank percentiles in tokens (see `percentile`), "mean": tokens}
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen_longer_share: float = 0.0  # pairs whose chosen completion has strictly more tokens than the rejected
    rejected_longer_share: float = 0.0  # pairs whose rejected completion has strictly more tokens
    equal_length_share: float = 0.0  # pairs whose completions have the same number of tokens
    duplicates: int = 0  # valid rows equal to an earlier row in (prompt, chosen, rejected); counted, not removed
    eval_in_train: int = 0  # eval pairs equal to a training pair in (prompt, chosen, rejected)
    unit: str = "pair"  # what one training example is: a pair, or one completion (SFT, KTO)
    labels: dict[str, int] = field(default_factory=dict)  # KTO: kept examples per label (desirable, undesirable)

    @property
    def length_bias(self) -> float:
        """chosen_longer_share - rejected_longer_share, in [-1, 1]; 0 when length says nothing about which
        reply is preferred. Warned about beyond ±LENGTH_BIAS_WARN: with no equal-length pairs that is exactly
        a chosen-longer share above 0.6 or below 0.4; pairs of equal length count as unbiased."""
        return self.chosen_longer_share - self.rejected_longer_share

    def summary(self) -> str:
        """2-4 short lines for the terminal at the start of `train`."""
        fmts = ", ".join(self.formats if len(self.formats) == 1 else (f"{k}: {v}" for k, v in self.formats.items()))
        bad = sum(self.malformed.values())
        reasons = sorted(self.malformed.items(), key=lambda kv: -kv[1])
        why = f" skipped ({'; '.join(f'{n}x {r}' for r, n in reasons[:3])}{'; ...' if len(reasons) > 3 else ''})"
        lines = [
            f"data: {self.rows_read} rows ({fmts}) from {self.source}, {bad} malformed{why if bad else ''}, "
            f"{self.dropped_for_length} {self.unit}s dropped for length (max_length={self.max_length})"
        ]
        if self.truncated_prompts or self.truncated_completions:
            lines.append(
                f"      truncated: {self.truncated_prompts} prompts to their last {self.max_prompt_length} tokens, "
                f"{self.truncated_completions} completions to fit max_length"
            )
        labels = "; " + ", ".join(f"{v} {k}" for k, v in self.labels.items()) if self.labels else ""
        lines.append(f"      {self.unit}s: {self.train_pairs} train, {self.eval_pairs} eval ({self.eval_from or 'no eval'})"
                     f"{labels}")
        if self.lengths:
            seq = self.lengths["sequence"]
            dup = f", {self.duplicates} exact {_plural(self.duplicates, 'duplicate')}" if self.duplicates else ""
            n = len(self.warnings())
            warn = f"; {n} {_plural(n, 'warning')} (see lora-dpo data)" if n else ""
            lines.append(
                f"      tokens: prompt+completion p50 {seq['p50']:g}, p99 {seq['p99']:g}, max {seq['max']:g}; "
                f"chosen longer in {_pct(self.chosen_longer_share)} of pairs{dup}{warn}"
            )
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """One line per thing in the data that can make training untrustworthy; [] when none applies."""
        out = []
        bad = sum(self.malformed.values())
        if bad:
            out.append(f"{bad} malformed {_plural(bad, 'row')} skipped (data.on_bad_rows=skip): {self._reasons()}")
        if self.stats_rows and abs(self.length_bias) > LENGTH_BIAS_WARN:
            out.append(
                f"chosen is longer than rejected in {_pct(self.chosen_longer_share)} of pairs and shorter in "
                f"{_pct(self.rejected_longer_share)}: DPO can learn to prefer length rather than quality "
                f"(compare reply lengths after training; pairs balanced for length avoid it)"
            )
        if self.duplicates:
            out.append(
                f"{self.duplicates} exact duplicate {_plural(self.duplicates, 'pair')} (same prompt, chosen and "
                f"rejected as an earlier row): counted, not removed, so each copy is trained on again"
            )
        if self.eval_in_train:
            out.append(
                f"{self.eval_in_train} eval {_plural(self.eval_in_train, 'pair')} also in the training pairs: "
                f"eval accuracy on them measures memory, not generalisation"
            )
        valid = self.rows_read - bad
        cut = self.dropped_for_length + self.truncated_pairs
        if valid and cut / valid > CUT_SHARE_WARN:
            fix = ""
            if self.lengths:
                seq, prompt = self.lengths["sequence"], self.lengths["prompt"]
                fix = (
                    f"; to keep 99% of pairs whole set data.max_length={seq['p99']:g} and "
                    f"data.max_prompt_length={prompt['p99']:g} (p99 of prompt+completion and of prompt; "
                    f"p90: {seq['p90']:g} and {prompt['p90']:g})"
                )
            out.append(
                f"{_pct(cut / valid)} of pairs were dropped ({self.dropped_for_length}) or truncated "
                f"({self.truncated_pairs}) at max_length={self.max_length}, max_prompt_length="
                f"{self.max_prompt_length}{fix}"
            )
        return out

    def format(self) -> str:
        """The full multi-line report that `lora-dpo data` prints: counts, token lengths, length bias, then
        warnings (wrapped to 100 columns)."""
        bad = sum(self.malformed.values())
        valid = self.rows_read - bad
        dropped = f"{_pct(self.dropped_for_length / valid)} of {valid} valid pairs; " if valid else ""
        counts = [
            ("read", self.rows_read, "row", ", ".join(f"{k}: {v}" for k, v in self.formats.items())),
            ("malformed, skipped", bad, "row", self._reasons()),
            ("dropped for length", self.dropped_for_length, self.unit,
             f"{dropped}max_length={self.max_length}, max_prompt_length={self.max_prompt_length}"),
            ("truncated", self.truncated_pairs, self.unit,
             f"kept with a cut: {self.truncated_prompts} prompts, {self.truncated_completions} completions"),
            ("exact duplicates", self.duplicates, "pair", "counted, not removed"),
            (f"training {self.unit}s", self.train_pairs, self.unit, ", ".join(f"{v} {k}" for k, v in self.labels.items())),
            (f"eval {self.unit}s", self.eval_pairs, self.unit, self.eval_from or "no eval"),
        ]  # fmt: skip
        if self.eval_in_train:
            counts.append(("eval in train", self.eval_in_train, "pair", "eval pairs that are also training pairs"))
        lines = [f"data report: {self.source}", "", "rows"]
        lines += [f"  {name:<20}{n:>8} {_plural(n, unit):<7}{note}".rstrip() for name, n, unit, note in counts]
        if self.lengths:
            n = self.stats_rows
            lines += [
                "",
                f"token lengths before truncation ({n} valid {_plural(n, 'row')} of the training source; "
                f"nearest-rank percentiles)",
                f"  {'tokens':<20}" + "".join(f"{k:>8}" for k in _STAT_KEYS),
            ]
            for name, label in (("prompt", "prompt"), ("chosen", "chosen"), ("rejected", "rejected"),
                                ("sequence", "prompt+completion")):  # fmt: skip
                stats = self.lengths[name]
                cells = "".join(f"{stats[k]:>8g}" for k in _STAT_KEYS[:-1]) + f"{stats['mean']:>8.1f}"
                lines.append(f"  {label:<20}{cells}")
            lines += [
                "  prompt+completion: the prompt and its longer completion, what data.max_length bounds",
                "",
                "length bias (completion tokens, chosen vs rejected)",
            ]
            for label, share in (("chosen longer", self.chosen_longer_share),
                                 ("rejected longer", self.rejected_longer_share),
                                 ("equal length", self.equal_length_share)):  # fmt: skip
                lines.append(f"  {label:<20}{_pct(share):>8}   {round(share * n)} of {n} {_plural(n, 'pair')}")
        warnings = self.warnings()
        lines += ["", "warnings" if warnings else "warnings: none"]
        for w in warnings:
            lines += textwrap.wrap(w, 100, initial_indent="  ! ", subsequent_indent="    ")
        return "\n".join(lines)

    def _reasons(self) -> str:
        """'2x chosen is empty; 1x ...', the most frequent reason first."""
        return "; ".join(f"{n}x {r}" for r, n in sorted(self.malformed.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["warnings"] = self.warnings()
        return out


LENGTH_BIAS_WARN = 0.2  # |chosen_longer_share - rejected_longer_share| beyond which the report warns
CUT_SHARE_WARN = 0.05  # share of valid pairs dropped or truncated beyond which the report suggests max_length
_STAT_KEYS = ("p50", "p90", "p99", "max", "mean")


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def percentile(sorted_values: list[int], p: int) -> int:
    """Nearest-rank percentile of ascending `sorted_values`: the smallest value with at least p% of the
    values at or below it, i.e. sorted_values[ceil(p * n / 100) - 1]. Always one of the values, so a
    percentile of token counts is a token count. Integer arithmetic: no float rounding at the boundary."""
    rank = -(-p * len(sorted_values) // 100)  # ceil(p * n / 100)
    return sorted_values[max(rank, 1) - 1]


def length_stats(values: list[int]) -> dict[str, float]:
    """{"p50", "p90", "p99", "max": nearest-rank percentiles, "mean": rounded to 2 decimals} of token counts."""
    s = sorted(values)
    return {"p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99), "max": s[-1],
            "mean": round(sum(s) / len(s), 2)}  # fmt: skip


# ----------------------------------------------------------------------------------------------- tokenising


class Measured(NamedTuple):
    """One valid row before truncation: its identity for duplicate counting and its token counts."""

    index: int
    key: bytes  # digest of the normalised (prompt, chosen, rejected): equal rows, equal keys
    prompt: int  # tokens, rendered prompt
    chosen: int  # tokens, EOS included
    rejected: int


def row_key(row: dict) -> bytes:
    """A normalised row's identity: equal (prompt, chosen, rejected), equal keys."""
    # a 16-byte digest rather than the text: a dataset of long conversations would otherwise be held twice
    text = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def profile(report: DataReport, measured: list[Measured]) -> None:
    """Fill the report's length, length-bias and duplicate figures from the training source's valid rows."""
    n = len(measured)
    report.stats_rows = n
    if not n:
        return
    report.lengths = {
        "prompt": length_stats([m.prompt for m in measured]),
        "chosen": length_stats([m.chosen for m in measured]),
        "rejected": length_stats([m.rejected for m in measured]),
        "sequence": length_stats([m.prompt + max(m.chosen, m.rejected) for m in measured]),
    }
    report.chosen_longer_share = sum(m.chosen > m.rejected for m in measured) / n
    report.rejected_longer_share = sum(m.chosen < m.rejected for m in measured) / n
    report.equal_length_share = sum(m.chosen == m.rejected for m in measured) / n
    report.duplicates = n - len({m.key for m in measured})
