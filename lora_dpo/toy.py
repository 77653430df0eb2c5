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

Everything is built by this module from fixed seeds, offline, in about a minute on a 2-core CPU, and cached
under `cache_root()/toy` (see `toy_model_path` and `toy_data_files`). `python -m lora_dpo.toy` builds both.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

WORLD_VERSION = "2"  # part of the cache key (with a digest of this file): bump it when the world changes

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


# ------------------------------------------------------------------------------------------- the tokenizer
SPECIAL_TOKENS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (  # <|role|>content<|end|> per turn; the generation prompt opens the assistant's turn
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _review_sentences() -> list[str]:
    """Every sentence a review can hold: the 3 verdicts, then all 1,296 adjective sentences."""
    adjective_sentences = [s.format(aspect=a, adj=w) for s in SENTENCES for a in ASPECTS
                           for w in POSITIVE + NEGATIVE + NEUTRAL]
    return [verdict for verdict, _ in VERDICTS] + adjective_sentences


def _tokenizer_corpus() -> list[str]:
    """Every prompt and every review sentence, alone (so the words that open a text are tokens without a leading
    space) and joined (so every word is a token with one)."""
    prompts = [r.format(title=f"the {a} {b}") for r in REQUESTS for a in TITLE_WORDS[0] for b in TITLE_WORDS[1]]
    sentences = _review_sentences()
    return prompts + sentences + [" ".join(sentences)]


def build_tokenizer():
    """Byte-level BPE (any text encodes) trained on the world's text, with the chat template above;
    EOS is the end-of-turn token <|end|>, padding is <|pad|>, there is no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: merging stops earlier, once every word is one token
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keep " ." as written, so decode(encode(text)) == text
        model_max_length=128,
    )


# ------------------------------------------------------------------------------------------- the base model
MODEL = dict(  # every linear layer's in/out features are multiples of 64: bitsandbytes quantises in blocks of 64
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=128, tie_word_embeddings=False,
)  # 2 layers learn this grammar as well as 4 (same held-out loss) in half the time
PRETRAIN = dict(
    seed=0,
    steps=900,  # optimizer steps, ~0.04 s each on 2 CPU cores; the grammar is learnt in ~200, the rest sharpens it
    batch_size=32,  # (prompt, review) sequences per step, ~33 tokens each, ~23 of them review tokens
    lr=1e-2,  # peak AdamW learning rate (high: the model is tiny), after `warmup` steps, then cosine decay to 0
    warmup=30,
    weight_decay=0.0,
)


def _reply_token_ids(tokenizer) -> list[int]:
    """Ids of every token a review can contain, EOS included."""
    ids = {tokenizer.eos_token_id}
    for sentence in _review_sentences():  # at a review's start ("i") and in its middle (" the")
        for text in (sentence, " " + sentence):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def pretrain_base_model(tokenizer):
    """A small Llama pre-trained in float32 on (prompt, review) pairs from the NEUTRAL generator, encoded with
    `data.encode_prompt` + `data.encode_completion`, exactly as DPO will feed it. The loss counts the review
    tokens and their EOS only: the model plays the assistant and is never asked to write prompts, and it is
    the same masking DPO uses. The global torch RNG is left as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dpo.data import encode_completion, encode_prompt

    cfg = PRETRAIN
    config = LlamaConfig(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),  # padded so that the output layer is a multiple of 64 too
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL,
    )
    rng = random.Random(cfg["seed"])
    # Output rows of tokens no review ever contains (bytes, pieces of words, prompt words, padding) stay at zero:
    # their logit is then 0 whatever the hidden state, and DPO cannot push mass onto them. Trained, Adam would
    # grow them all along one direction, and the first nudge of the hidden state would spill mass onto hundreds
    # of byte tokens at once.
    never_said = torch.ones(config.vocab_size, dtype=torch.bool)
    never_said[_reply_token_ids(tokenizer)] = False
    prompt_ids: dict[str, list[int]] = {}  # only 320 distinct prompts: render each chat template once
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight[never_said] = 0.0
        hook = model.lm_head.weight.register_hook(lambda grad: grad.masked_fill(never_said[:, None], 0.0))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        for step in range(cfg["steps"]):
            lr_scale = min(1.0, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * lr_scale
            seqs, labels = [], []
            for _ in range(cfg["batch_size"]):
                prompt = sample_prompt(rng)
                if prompt not in prompt_ids:
                    prompt_ids[prompt] = encode_prompt(tokenizer, prompt)
                p = prompt_ids[prompt]
                c = encode_completion(tokenizer, sample_review(rng))
                seqs.append(p + c)
                labels.append([-100] * len(p) + c)
            width = max(map(len, seqs))
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            label_ids = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        hook.remove()
    model.eval()
    # generate() stops at end-of-turn, pads with <|pad|>, and has room for a whole prompt + review by default
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = 48  # a review is at most 25 tokens, EOS included
    return model, loss.item()


# ------------------------------------------------------------------------------------------------ the cache
TRAIN_PAIRS, TEST_PAIRS = 2000, 200
TRAIN_SEED, TEST_SEED = 0, 1  # the test split's prompts and reviews come from a differently seeded stream


def cache_root() -> Path:
    """$LORA_DPO_CACHE, or ~/.cache/lora_dpo."""
    return Path(os.environ.get("LORA_DPO_CACHE") or Path.home() / ".cache" / "lora_dpo")


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename it into place, so that a killed build never leaves a half-
    written cache; when another process finished first, keep its folder and discard ours."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would otherwise become the cache's mode
        build(tmp)
        if not target.exists():
            try:
                os.replace(tmp, target)  # atomic; fails if another process has put a non-empty folder there
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_data(folder: Path) -> None:
    for name, n, seed in (("train", TRAIN_PAIRS, TRAIN_SEED), ("test", TEST_PAIRS, TEST_SEED)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_pairs(n, seed))


def _write_model(folder: Path) -> None:
    start = time.perf_counter()
    print(f"lora_dpo.toy: building the toy world (once, ~1 min) in {folder.parent} ...", file=sys.stderr, flush=True)
    tokenizer = build_tokenizer()
    model, loss = pretrain_base_model(tokenizer)
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file of ~3 MB: a progress bar would only be noise
    try:
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    print(f"lora_dpo.toy: built the toy base model in {time.perf_counter() - start:.0f} s "
          f"(final pretraining loss {loss:.3f})", file=sys.stderr, flush=True)


def world_key() -> str:
    """The cache key: WORLD_VERSION plus a digest of this module's source, so that any change to the words,
    grammar, tokenizer or pre-training invalidates a cached world even if nobody bumps the version."""
    import hashlib

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return f"{WORLD_VERSION}-{digest}"


def toy_model_path() -> Path:
    """Folder with the toy tokenizer and base model, for AutoTokenizer / AutoModelForCausalLM.from_pretrained;
    built (about a minute) the first time."""
    return _build_once(cache_root() / "toy" / f"model-{world_key()}", _write_model)


def toy_data_files() -> dict[str, str]:
    """{"train": path, "test": path} of standard-format jsonl preference pairs; written the first time."""
    folder = _build_once(cache_root() / "toy" / f"data-{world_key()}", _write_data)
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}


if __name__ == "__main__":
    print(f"model: {toy_model_path()}")
    for split, path in toy_data_files().items():
        print(f"{split}: {path}")
