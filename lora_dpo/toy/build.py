"""The toy world's tokenizer and pre-trained base model, and the cache they are built into once.

Everything is built from fixed seeds, offline, in about a minute on a 2-core CPU, and cached under
`cache_root()/toy`, keyed by WORLD_VERSION and a digest of the toy world's source (world.py and this file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from ..data.tokenize import encode_completion, encode_prompt
from ..paths import cache_root
from .world import (ASPECTS, NEGATIVE, NEUTRAL, POSITIVE, REQUESTS, SENTENCES, TITLE_WORDS, VERDICTS, WORLD_VERSION,
                    make_pairs, sample_prompt, sample_review)

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
    `encode_prompt` + `encode_completion` (data/tokenize.py), exactly as DPO will feed it. The loss counts the review
    tokens and their EOS only: the model plays the assistant and is never asked to write prompts, and it is
    the same masking DPO uses. The global torch RNG is left as it was."""
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
    """The cache key: WORLD_VERSION plus a digest of the world's source (world.py and this module), so that any
    change to the words, grammar, tokenizer or pre-training invalidates a cached world even if nobody bumps the
    version."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in ("world.py", "build.py"))).hexdigest()[:10]
    return f"{WORLD_VERSION}-{digest}"


def toy_model_path() -> Path:
    """Folder with the toy tokenizer and base model, for AutoTokenizer / AutoModelForCausalLM.from_pretrained;
    built (about a minute) the first time."""
    return _build_once(cache_root() / "toy" / f"model-{world_key()}", _write_model)


def toy_data_files() -> dict[str, str]:
    """{"train": path, "test": path} of standard-format jsonl preference pairs; written the first time."""
    folder = _build_once(cache_root() / "toy" / f"data-{world_key()}", _write_data)
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
