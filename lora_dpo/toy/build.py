"""The toy world's tokenizer and pre-trained base model: how the base that ships in `base/` was made.

The base ships with the package (1.9 MB), so the demo runs on the same weights on every machine, whatever its
torch build, CPU, thread count or GPU, and a newcomer waits for no build. This module is the recipe it was
made with, from fixed seeds, offline, in about a minute on one CPU thread: `python -m lora_dpo.toy build DIR`
makes it again and says whether the bits equal the shipped ones. Pre-training runs on one thread, so its bits
do not depend on the machine's thread count (tests/toy/test_toy.py); `base/build.json` records what built it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from ..data.tokenize import encode_completion, encode_prompt
from ..progress import progress
from .world import (ASPECTS, NEGATIVE, NEUTRAL, POSITIVE, REQUESTS, SENTENCES, TITLE_WORDS, VERDICTS, sample_prompt,
                    sample_review)

BASE = Path(__file__).parent / "base"  # the shipped base: tokenizer and pre-trained model, as from_pretrained reads it
RECORD = "build.json"  # beside it: what built it (sources' digest, torch, CPU) and the weights' sha256

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
        for step in progress(range(cfg["steps"]), desc="toy world: pre-training the base", unit="step"):
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


# ------------------------------------------------------------------------------------------------ building


def source_digest() -> str:
    """Digest of the sources the base is made from: the world (its words and grammar) and this module."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("world.py", "build.py"))).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block: a sum split across threads rounds differently, so a build on
    N threads could differ from one on M; on one thread it is the same everywhere a CPU runs the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_base(folder: Path) -> dict:
    """Build the tokenizer, pre-train the base (one thread) and save both into `folder` with the build record;
    returns the record."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with one_thread():
        tokenizer = build_tokenizer()
        model, loss = pretrain_base_model(tokenizer)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file of ~2 MB: a progress bar would only be noise
    try:
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    record = {"sources": source_digest(), "model_sha256": file_digest(folder / "model.safetensors"),
              "final_pretraining_loss": round(loss, 6), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
              "seconds": round(time.perf_counter() - start)}
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def shipped_record() -> dict:
    return json.loads((BASE / RECORD).read_text())


def toy_model_path() -> Path:
    """Folder with the toy tokenizer and base model, for AutoTokenizer / AutoModelForCausalLM.from_pretrained: the
    one that ships with the package (nothing to build)."""
    return BASE
