"""The offline toy world: preference data with a known truth, a tiny tokenizer, a tiny base model that speaks it.

Like the controlled-sentiment experiment of the DPO paper: a user asks for a review of a title ("write a review
of the night train ."), and the reply is a verdict and 3-4 short sentences from a small grammar:

    i loved it . the acting was superb . the plot felt clever . the music is moving .

The reviewer loved, hated or merely watched the title (1/3 each), and every adjective of the review comes from
the verdict's list: POSITIVE, NEGATIVE or NEUTRAL.
The truth is known exactly: `sentiment_score` counts positive minus negative words, and the behaviour DPO should
raise is `positive_share`, the share of positive adjectives, about 1/3 for the base model.

Why whole reviews share one sentiment rather than each sentence drawing its own: DPO reweights what the base model
already does. Had each adjective been drawn on its own, the 27 adjectives would be interchangeable to the base
model, their output embeddings nearly equal, and "positive" no direction it knows: DPO with LoRA then moves the
share of positive words only by rotating the hidden states so far that the grammar breaks (measured: the share
stalls below 0.5, or the grammar goes first). Real reviews, and the IMDB reviews of the DPO paper, have one
sentiment each; so do these, and the base model learns "positive" as one direction it can be moved along.

Everything is built by this package from fixed seeds, offline, in about a minute on a 2-core CPU, and cached
under `cache_root()/toy` (see `toy_model_path` and `toy_data_files`). `python -m lora_dpo.toy` builds both (build.py).
"""

from __future__ import annotations

import random
import re

WORLD_VERSION = "2"  # part of the cache key (with a digest of the world's source): bump it when the world changes

# ---------------------------------------------------------------------------------------------- the world
POSITIVE = ("superb", "wonderful", "brilliant", "charming", "delightful", "gripping", "clever", "beautiful", "moving")
NEGATIVE = ("dull", "awful", "boring", "clumsy", "tedious", "terrible", "bland", "messy", "weak")
NEUTRAL = ("long", "short", "loud", "quiet", "simple", "modern", "familiar", "ordinary", "unusual")
ASPECTS = ("acting", "plot", "music", "ending", "dialogue", "pacing", "cast", "story", "script", "soundtrack",
           "setting", "camera")
VERBS = ("was", "is", "felt", "seemed")
# Every slot is named by the token before it (the -> aspect -> verb -> adjective -> "."), so that an adjective
# slot is hard to mistake for another slot when DPO moves the hidden state there.
SENTENCES = tuple(f"the {{aspect}} {verb} {{adj}} ." for verb in VERBS)
VERDICTS = (("i loved it .", POSITIVE), ("i hated it .", NEGATIVE), ("i watched it .", NEUTRAL))
MIN_SENTENCES, MAX_SENTENCES = 3, 4  # adjective sentences after the verdict
TITLE_WORDS = (("night", "silver", "last", "hidden", "northern", "red", "winter", "lost"),
               ("train", "garden", "river", "king", "letter", "harbor", "mountain", "island"))
REQUESTS = ("write a review of {title} .", "write a brief review of {title} .", "review {title} .",
            "what did you think of {title} ?", "tell me about {title} .")

_WORD = re.compile(r"[a-z]+")
_POSITIVE, _NEGATIVE, _NEUTRAL = frozenset(POSITIVE), frozenset(NEGATIVE), frozenset(NEUTRAL)
_SENTENCE = re.compile(rf"the (?P<aspect>[a-z]+) (?:{'|'.join(VERBS)}) (?P<adj>[a-z]+) \.")


def sample_prompt(rng: random.Random) -> str:
    """A request for a review of one of the 64 titles, in one of 5 phrasings."""
    title = "the " + " ".join(rng.choice(words) for words in TITLE_WORDS)
    return rng.choice(REQUESTS).format(title=title)


def sample_review(rng: random.Random) -> str:
    """A review from the NEUTRAL generator: a verdict drawn uniformly from VERDICTS, then 3-4 sentences about
    distinct aspects, each with an adjective from the verdict's list."""
    verdict, adjectives = rng.choice(VERDICTS)
    aspects = rng.sample(ASPECTS, rng.randint(MIN_SENTENCES, MAX_SENTENCES))
    return " ".join([verdict] + [rng.choice(SENTENCES).format(aspect=a, adj=rng.choice(adjectives)) for a in aspects])


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentiment_score(text: str) -> int:
    """The known truth: number of positive words minus number of negative words (case-insensitive)."""
    words = _words(text)
    return sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)


def positive_share(text: str) -> float:
    """The behaviour score: positive words / (positive + negative + neutral words); 0.0 without any.
    About 1/3 for the neutral generator, 1.0 for an all-positive review."""
    words = _words(text)
    pos = sum(w in _POSITIVE for w in words)
    slots = pos + sum(w in _NEGATIVE or w in _NEUTRAL for w in words)
    return pos / slots if slots else 0.0


def is_grammatical(text: str) -> bool:
    """True when `text` is a verdict then 3-4 sentences of the review grammar, with world aspects and adjectives.
    Form only: repeated aspects, or adjectives that disagree with the verdict, are still grammatical."""
    sentences = [s.strip() + " ." for s in text.strip().split(" .") if s.strip()]
    if not text.strip().endswith(" .") or not MIN_SENTENCES + 1 <= len(sentences) <= MAX_SENTENCES + 1:
        return False
    if sentences[0] not in {verdict for verdict, _ in VERDICTS}:
        return False
    for sentence in sentences[1:]:
        m = _SENTENCE.fullmatch(sentence)
        if m is None or m["aspect"] not in ASPECTS or m["adj"] not in _POSITIVE | _NEGATIVE | _NEUTRAL:
            return False
    return True


def make_pairs(n: int, seed: int) -> list[dict]:
    """`n` preference rows in the standard format {"prompt", "chosen", "rejected"}: two reviews from the
    neutral generator per prompt, chosen = the higher sentiment_score (ties are resampled)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = sample_prompt(rng)
        while True:
            a, b = sample_review(rng), sample_review(rng)
            if sentiment_score(a) != sentiment_score(b):
                break
        chosen, rejected = (a, b) if sentiment_score(a) > sentiment_score(b) else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
