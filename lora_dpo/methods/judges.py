"""Judges of online DPO: score k sampled completions per prompt, higher is better.

A judge is named by a spec string (the recipe key `online.judge`):

    NAME                        a judge registered by name (names.py; the toy world registers `toy`: its truth)
    reward_model:PATH_OR_HUB_ID a sequence-classification reward model with num_labels == 1
    module:function             fn(prompt, completions: list[str]) -> list[float], higher is better
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .. import names
from ..config.callables import SAMPLE_TEXT, import_callable, try_once
from ..data.tokenize import Prompt, render_prompt
from ..errors import ConfigError, first_line

KEY = "online.judge"  # the recipe key every judge error names
REWARD_MODEL_PREFIX = "reward_model:"
SPEC_FORMS = f"a judge's name, '{REWARD_MODEL_PREFIX}PATH_OR_HUB_ID' or 'module:function'"  # for the error messages


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
    a template, the plain prompt (`data.tokenize.render_prompt`) then a space then the completion. Texts are scored in
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
    if names.lookup("judge", spec) is not None:
        return
    if spec.startswith(REWARD_MODEL_PREFIX):
        if not spec[len(REWARD_MODEL_PREFIX) :]:
            raise ConfigError(f"{KEY}: '{REWARD_MODEL_PREFIX}' needs a local folder or a Hub id after it")
        return
    fn = import_callable(spec, KEY, SPEC_FORMS)
    returned = try_once(fn, ("A sample prompt.", [SAMPLE_TEXT, SAMPLE_TEXT]), KEY, spec,
                        "fn(prompt, completions: list[str]) -> list[float]")
    _as_scores(returned, 2, spec)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _load_reward_model(source: str, device: torch.device, batch_size: int) -> RewardModelJudge:
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
    if (make := names.lookup("judge", spec)) is not None:
        return make()
    if spec.startswith(REWARD_MODEL_PREFIX):
        device = torch.device(device) if device is not None else _default_device()
        return _load_reward_model(spec[len(REWARD_MODEL_PREFIX) :], device, batch_size)
    return CallableJudge(import_callable(spec, KEY, SPEC_FORMS), name=spec)
