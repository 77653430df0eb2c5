"""Tiny tokenizers and models built in-process, saved to a folder, loaded back the way users load theirs.

Nothing here touches the network: the tokenizers are byte-level BPEs trained on a few sentences (so any
text encodes), the models are 2-layer Llama / Qwen2 architectures with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "the movie was great and the acting was wonderful .",
    "the plot was dull and the music was boring .",
    "write a short review of the film night train .",
    "Human: what is the capital of France? Assistant: Paris is the capital of France.",
    "You are a helpful assistant. Answer briefly and truthfully.",
]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _bpe(specials: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-style: ChatML template, EOS is the end-of-turn token, a pad token."""
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3-style: BOS in the template, EOS is <|eot_id|>, and no pad token (as in the real one)."""
    tok = _bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A base-model tokenizer: no chat template, no pad token."""
    tok = _bpe(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def tiny_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer causal LM of the named architecture ('llama' or 'qwen2') with random weights."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(arch)


def save_tiny(folder: Path, arch: str = "llama", tokenizer: str = "chatml", seed: int = 0) -> Path:
    """Build a tokenizer and a model, save both to `folder`, return it (a path `from_pretrained` accepts)."""
    tok = {"chatml": chatml_tokenizer, "llama3": llama3_tokenizer, "plain": plain_tokenizer}[tokenizer]()
    model = tiny_model(arch, len(tok), seed=seed)
    if tok.eos_token_id is not None:
        model.config.eos_token_id = tok.eos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def save_random_adapter(folder: Path, base: Path, seed: int = 0, scale: float = 0.1) -> Path:
    """A LoRA adapter (r=4, every linear layer) on the saved model `base` whose B matrices are random (std
    `scale`), so that it moves log-probs visibly; saved in peft's format with the base's tokenizer beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * scale
    peft.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def shared_sequence_logps(model, batch, chunk_tokens=None):
    """The summed log-probs of a shared-prompt batch (data/batches.collate_shared): 2 sequences (chosen, then
    rejected) per row, through the one log-prob function of both layouts."""
    from lora_dpo.core.logps import completion_logps
    from lora_dpo.data.batches import forward_inputs

    return completion_logps(model, forward_inputs(batch), 2 * batch["input_ids"].shape[0], chunk_tokens)


REPO = Path(__file__).resolve().parents[1]  # the repository: recipes/, README.md


def random_pairs(vocab: int, seed: int = 0):
    """Four EncodedPairs of random token ids, prompt/chosen/rejected lengths chosen to need padding and to include
    one-token replies."""
    from lora_dpo.data.pairs import EncodedPair

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(5, 4, 6), (3, 1, 2), (7, 5, 5), (1, 3, 1)]  # (prompt, chosen, rejected): padding, 1-token replies
    return [EncodedPair(index=i, prompt="", prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r))
            for i, (p, c, r) in enumerate(lengths)]
