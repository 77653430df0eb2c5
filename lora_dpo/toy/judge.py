"""The toy world's judge and quality score: its known truth, for online DPO (`online.judge: toy`) and as an
`eval.scorer` (`lora_dpo.toy:toy_quality`)."""

from __future__ import annotations

from ..methods.judges import Judge
from .world import MAX_SENTENCES, is_grammatical, positive_share, sentiment_score

# A grammatical toy review has at most MAX_SENTENCES adjectives, so its sentiment_score is at least
# -MAX_SENTENCES; broken text scores below that.
UNGRAMMATICAL_SCORE = -float(MAX_SENTENCES + 1)


class ToyJudge(Judge):
    """The toy world's known truth: positive minus negative words; an ungrammatical text scores below every
    grammatical one (all broken texts alike, so two broken samples tie and never make a pair)."""

    name = "toy"

    def score(self, prompts, completions):
        return [
            [float(sentiment_score(t)) if is_grammatical(t) else UNGRAMMATICAL_SCORE for t in texts]
            for texts in completions
        ]


def toy_quality(text: str) -> float:
    """A behaviour score for the toy world that counts only well-formed reviews: `positive_share` of a
    grammatical review, 0 for broken text (the toy judge's view, scaled to [0, 1])."""
    return positive_share(text) if is_grammatical(text) else 0.0
