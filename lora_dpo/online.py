"""Online DPO, the sampling-and-judging half: sample k completions per prompt from the current policy, score
them with a judge, and turn each prompt's best and worst completion into a training pair.

The pairs are `data.EncodedPair`s tokenised exactly as offline pairs are, with one difference that matters:
a sampled completion keeps the token ids the policy generated (never decoded and re-encoded, which can
change them), so DPO trains on the very tokens the policy sampled. See `sample_completions`.

A judge is named by a spec string (the recipe key `online.judge`):

    toy                         the toy world's known truth (lora_dpo.toy): sentiment_score, broken text last
    reward_model:PATH_OR_HUB_ID a sequence-classification reward model with num_labels == 1
    module:function             fn(prompt, completions: list[str]) -> list[float], higher is better
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .data import EncodedPair, Prompt, encode_prompt, render_prompt
from .generate import eval_mode, import_callable
from .errors import ConfigError, first_line
from .toy import MAX_SENTENCES, is_grammatical, sentiment_score

__all__ = [
    "Judge", "Sample", "load_judge", "check_judge_spec", "sample_completions", "prompt_ids", "build_pairs",
    "online_pairs", "UNGRAMMATICAL_SCORE",
]  # fmt: skip

KEY = "online.judge"  # the recipe key every judge error names
REWARD_MODEL_PREFIX = "reward_model:"
SPEC_FORMS = f"'toy', '{REWARD_MODEL_PREFIX}PATH_OR_HUB_ID' or 'module:function'"  # for the error messages
# A grammatical toy review has at most MAX_SENTENCES adjectives, so its sentiment_score is at least
# -MAX_SENTENCES; broken text scores below that.
UNGRAMMATICAL_SCORE = -float(MAX_SENTENCES + 1)


# ------------------------------------------------------------------------------------------------- judges


class Judge:
    """Scores completions: `judge(prompts, completions)` with `completions[i]` the k texts sampled for
    `prompts[i]` returns `scores[i][j]`, a finite float per completion, higher is better."""

    name: str

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} lists of completions")
        return self.score(prompts, completions)

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError


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
    from .toy import positive_share

    return positive_share(text) if is_grammatical(text) else 0.0


class CallableJudge(Judge):
    """`fn(prompt, completions) -> scores`, called once per prompt; its return is checked every call."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score(self, prompts, completions):
        out = []
        for prompt, texts in zip(prompts, completions):
            returned = self.fn(prompt, list(texts))
            out.append(_as_scores(returned, len(texts), self.name))
        return out


def _as_scores(returned, n: int, name: str) -> list[float]:
    """`returned` as n finite floats, or a ConfigError that says what `name` returned instead."""
    values = returned.tolist() if hasattr(returned, "tolist") else returned  # a tensor or numpy array
    shown = repr(returned) if len(repr(returned)) <= 200 else repr(returned)[:200] + "..."
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ConfigError(f"{KEY}: {name} must return a list of {n} numbers (one per completion), got {shown}")
    bad = [v for v in values if not isinstance(v, numbers.Real) or not math.isfinite(v)]
    if bad:
        raise ConfigError(f"{KEY}: {name} must return finite numbers, got {bad[0]!r} in {shown}")
    return [float(v) for v in values]


class RewardModelJudge(Judge):
    """A sequence-classification model with one output (a reward model, as TRL's RewardTrainer writes one).

    It reads the conversation rendered with its own tokenizer's chat template (messages = the prompt's
    messages, a string prompt as one user message, then the completion as the assistant's message); without
    a template, the plain prompt (`data.render_prompt`) then a space then the completion. Texts are scored in
    batches, in eval mode, without gradients; padding is the model's own `pad_token_id`, which is how it
    finds the last token to score (`GenericForSequenceClassification`); a model without one is run one text
    at a time. Texts are not truncated: the model must take prompt + completion whole.
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    def render(self, prompt: Prompt, completion: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        text = render_prompt(tok, prompt)
        return text + completion if not text or text[-1].isspace() else f"{text} {completion}"

    def encode(self, text: str) -> list[int]:
        # a chat template writes its own BOS; plain text gets the tokenizer's special tokens
        return self.tokenizer(text, add_special_tokens=not getattr(self.tokenizer, "chat_template", None))["input_ids"]

    @torch.no_grad()
    def score(self, prompts, completions):
        rows = [self.encode(self.render(p, c)) for p, texts in zip(prompts, completions) for c in texts]
        pad = self.model.config.get_text_config().pad_token_id
        step = self.batch_size if pad is not None else 1
        device = next(self.model.parameters()).device
        flat: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                width = max(len(r) for r in chunk)
                # right padding with the model's pad id; it pools at the last token that is not a pad
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
                attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
                flat.extend(self.model(input_ids=ids, attention_mask=attn).logits[:, 0].float().tolist())
        finally:
            self.model.train(was_training)
        out, at = [], 0
        for texts in completions:
            out.append(_as_scores(flat[at : at + len(texts)], len(texts), self.name))
            at += len(texts)
        return out


def check_judge_spec(spec: str) -> None:
    """Validate a spec without loading a model, so a bad recipe fails before anything loads: the syntax,
    and for `module:function` the import. Raises ConfigError naming `online.judge`."""
    if not isinstance(spec, str):
        raise ConfigError(f"{KEY}: expected a string, got {spec!r}")
    if spec == "toy":
        return
    if spec.startswith(REWARD_MODEL_PREFIX):
        if not spec[len(REWARD_MODEL_PREFIX) :]:
            raise ConfigError(f"{KEY}: '{REWARD_MODEL_PREFIX}' needs a local folder or a Hub id after it")
        return
    import_callable(spec, KEY, SPEC_FORMS)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _load_reward_model(source: str, device: torch.device, batch_size: int) -> RewardModelJudge:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model, info = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:  # missing folder, unknown Hub id, not a classifier architecture
        raise ConfigError(f"{KEY}: cannot load a reward model from '{source}': {first_line(exc)}") from None
    if model.config.num_labels != 1:
        raise ConfigError(
            f"{KEY}: '{source}' has {model.config.num_labels} output labels; a reward model has exactly 1"
        )
    if info.get("missing_keys"):  # e.g. a plain causal LM: its score head would be freshly random
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise ConfigError(f"{KEY}: '{source}' has no trained weights for {missing}; is it a reward model?")
    model.to(device).eval().requires_grad_(False)
    return RewardModelJudge(model, tokenizer, name=f"{REWARD_MODEL_PREFIX}{source}", batch_size=batch_size)


def load_judge(spec: str, device: torch.device | str | None = None, batch_size: int = 16) -> Judge:
    """The judge a spec names (see the module docstring). `device` places a reward model (default: the
    current CUDA device, else the CPU); `batch_size`: texts per reward-model forward. Raises ConfigError
    naming `online.judge`."""
    check_judge_spec(spec)
    if spec == "toy":
        return ToyJudge()
    if spec.startswith(REWARD_MODEL_PREFIX):
        device = torch.device(device) if device is not None else _default_device()
        return _load_reward_model(spec[len(REWARD_MODEL_PREFIX) :], device, batch_size)
    return CallableJudge(import_callable(spec, KEY, SPEC_FORMS), name=spec)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class Sample:
    ids: list[int]  # the generated token ids: up to and including the first EOS; no EOS when cut short
    text: str  # ids decoded without special tokens, stripped: what the judge reads
    finished: bool  # ends with EOS (False: hit max_new_tokens, or cut to fit max_length)


def prompt_ids(tokenizer, prompt: Prompt, max_prompt_length: int | None = None) -> list[int]:
    """`data.encode_prompt`, cut from the left to `max_prompt_length` keeping a leading BOS: the rule of
    `data._truncate`, so an online pair's prompt is the one an offline pair of that prompt would get."""
    ids = encode_prompt(tokenizer, prompt)
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None and ids[0] == bos and max_prompt_length > 1 else []
    return head + ids[len(ids) - (max_prompt_length - len(head)) :]


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    k: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 32,
) -> list[list[Sample]]:
    """k samples per prompt from the model as it is (the policy: adapter on), `result[i][j]` for prompt i.

    Tokenisation contract: the prompt is `prompt_ids(tokenizer, prompt, max_prompt_length)`, the context
    training will use; a sample keeps the ids the model generated, up to and including the first
    `tokenizer.eos_token_id` (the EOS `data.encode_completion` appends, so a finished sample ends exactly as
    an offline completion does). A sample that reaches `max_new_tokens` without EOS is kept as it is, with
    no EOS added: DPO then trains on a cut completion, as it does on an offline one cut to max_length. With
    `max_length`, each sample is cut to `max_length - len(prompt ids)` tokens before it is decoded, so the
    judge reads exactly the tokens that will be trained on.

    Pure sampling: temperature and top_p only (the model's generation_config's top_k, repetition penalty and
    the like are switched off); temperature 0 decodes greedily. A forked RNG seeded with `seed` draws the
    samples: the same seed and batch give the same samples, and the caller's RNG stream is untouched. The
    model's train/eval mode is restored. Rows go to `model.generate` `batch_size` at a time (prompts
    repeated k times, left-padded).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    rows = [i for i in range(len(prompts)) for _ in range(k)]  # prompt i's k samples are adjacent
    budget = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(e)) for e in encoded]
    for i, b in enumerate(budget):
        if b < 1:
            raise ValueError(f"prompt {i}: {len(encoded[i])} tokens leave no room in max_length {max_length}")
    if temperature > 0:
        # transformers fills unset flags from the model's generation_config, then from global defaults
        # (top_k=50): set them, so that only temperature and top_p shape the policy's distribution
        sampling = dict(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )  # fmt: skip
    else:
        sampling = dict(do_sample=False)
    samples: list[Sample] = []
    cuda = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            # left padding: every prompt ends at the same column, where generation starts
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
            attn = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
            new = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max(budget[i] for i in chunk),
                pad_token_id=pad,
                eos_token_id=eos,  # the EOS encode_completion ends a completion with, not a model's other stops
                use_cache=True,
                **sampling,
            )[:, width:].tolist()
            for i, row in zip(chunk, new):
                # generate pads a row only after its EOS, so a row without EOS is all generated tokens
                cut = row.index(eos) + 1 if eos in row else len(row)
                kept = row[: min(cut, budget[i])]
                finished = bool(kept) and kept[-1] == eos
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                samples.append(Sample(ids=kept, text=text, finished=finished))
    return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------------------- pairing


def build_pairs(
    tokenizer,
    prompts: Sequence[Prompt],
    samples: Sequence[Sequence[Sample]],
    scores: Sequence[Sequence[float]],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[list[EncodedPair], dict]:
    """One pair per prompt: chosen = its best-scored sample, rejected = its worst (the first of equals).

    A prompt yields no pair when its best and worst scores are equal (`online/ties`) or its best and worst
    samples have the same token ids (`online/identical`). Prompt ids are `prompt_ids(tokenizer, prompt,
    max_prompt_length)` (None: max_length // 2, as `data.build_datasets`); completion ids are the sampled
    ids, cut from the right to `max_length - len(prompt ids)` (a no-op on samples drawn with that max_length).
    `indices[i]` becomes pair.index (default: i).

    Returns (pairs, stats) with stats `online/prompts`, `online/pairs`, `online/ties`, `online/identical`,
    `online/score` (mean score of every sample), `online/score_chosen` and `online/score_rejected` (means over
    the pairs, None without pairs), `online/distinct` (distinct samples of a prompt / k, averaged),
    `online/finished` (share of samples ending with EOS) and `online/length` (mean sample tokens).
    """
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if not len(prompts) == len(samples) == len(scores) == len(indices):
        raise ValueError("prompts, samples, scores and indices must have one entry per prompt")
    pairs: list[EncodedPair] = []
    ties = identical = 0
    chosen_scores, rejected_scores, all_scores = [], [], []
    distinct = n_samples = finished = tokens = 0
    for index, prompt, group, group_scores in zip(indices, prompts, samples, scores):
        if len(group) != len(group_scores) or not group:
            raise ValueError(f"prompt {index}: {len(group)} samples but {len(group_scores)} scores")
        all_scores.extend(group_scores)
        distinct += len({tuple(s.ids) for s in group})
        n_samples += len(group)
        finished += sum(s.finished for s in group)
        tokens += sum(len(s.ids) for s in group)
        best = max(range(len(group)), key=lambda j: group_scores[j])  # first of equals
        worst = min(range(len(group)), key=lambda j: group_scores[j])
        if group_scores[best] == group_scores[worst]:
            ties += 1
            continue
        p = prompt_ids(tokenizer, prompt, max_prompt)
        room = max_length - len(p)
        if room < 1:
            raise ValueError(f"prompt {index}: {len(p)} prompt tokens leave no room in max_length {max_length}")
        chosen, rejected = group[best].ids[:room], group[worst].ids[:room]
        if chosen == rejected:
            identical += 1
            continue
        pairs.append(EncodedPair(index=index, prompt=prompt, prompt_ids=p, chosen_ids=chosen, rejected_ids=rejected))
        chosen_scores.append(group_scores[best])
        rejected_scores.append(group_scores[worst])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    stats = {
        "online/prompts": len(prompts),
        "online/pairs": len(pairs),
        "online/ties": ties,
        "online/identical": identical,
        "online/score": mean(all_scores),
        "online/score_chosen": mean(chosen_scores),
        "online/score_rejected": mean(rejected_scores),
        "online/distinct": distinct / n_samples if n_samples else None,
        "online/finished": finished / n_samples if n_samples else None,
        "online/length": tokens / n_samples if n_samples else None,
    }
    return pairs, stats


def online_pairs(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: Judge,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_length: int,
    max_prompt_length: int | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 32,
) -> tuple[list[EncodedPair], dict]:
    """One optimizer step's pairs: k samples per prompt from the policy (`sample_completions`), scored by
    `judge`, best vs worst (`build_pairs`). Pass a seed that changes every step (e.g. recipe seed + step)
    so that a resumed run draws the same samples. Returns (pairs, stats); fewer pairs than prompts when
    some prompts tie (counted in stats)."""
    if k < 2:
        raise ValueError(f"online DPO needs k >= 2 samples per prompt, got {k}")
    if temperature <= 0:
        raise ValueError("online DPO needs temperature > 0: greedy decoding gives k identical samples")
    max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    if max_prompt >= max_length:
        raise ValueError(f"max_prompt_length {max_prompt} leaves no room for a completion in max_length {max_length}")
    samples = sample_completions(
        model, tokenizer, prompts, k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, max_length=max_length, max_prompt_length=max_prompt, batch_size=batch_size,
    )  # fmt: skip
    scores = judge(prompts, [[s.text for s in group] for group in samples])
    return build_pairs(
        tokenizer, prompts, samples, scores, max_length=max_length, max_prompt_length=max_prompt, indices=indices
    )
