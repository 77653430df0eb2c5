"""The tokens lora-dpo trains for each reply equal those TRL 1.16's DPOTrainer produces for the same row, with chat
templates whose end of turn differs: SmolLM2's ChatML (with its default system prompt), a Gemma-style template
(`<end_of_turn>` is not EOS) and a Qwen2.5-base-style ChatML whose EOS is `<|endoftext|>`, not `<|im_end|>`."""

from __future__ import annotations

import json
import types

import pytest
from transformers import PreTrainedTokenizerFast

from lora_dpo.config import DataConfig
from lora_dpo.data.examples import build_completion_datasets
from lora_dpo.data.pairs import build_datasets
from lora_dpo.data.tokenize import reply_end, stop_ids
from tiny import _bpe

trl = pytest.importorskip("trl", reason="the `dev` extra installs trl (the parity reference)")
from trl import DPOConfig, DPOTrainer  # noqa: E402

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
QWEN_BASE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2():
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", chat_template=SMOLLM2)


def gemma():
    tok = _bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], chat_template=GEMMA)


def qwen_base():
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=QWEN_BASE)


TOKENIZERS = {"smollm2": smollm2, "gemma": gemma, "qwen2.5-base": qwen_base}
END_OF_TURN = {"smollm2": "<|im_end|>", "gemma": "<end_of_turn>", "qwen2.5-base": "<|im_end|>"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ROWS = [
    {"prompt": [user("write a short review of the film night train .")],
     "chosen": [assistant("the movie was great and the acting was wonderful .")],
     "rejected": [assistant("the plot was dull .")]},
    {"prompt": [{"role": "system", "content": "Answer briefly and truthfully."}, user("what is the capital of France?")],
     "chosen": [assistant("Paris is the capital of France.")], "rejected": [assistant("Rome.")]},
    {"prompt": [user("Human: what is the capital?"), assistant("Paris."), user("and the music?")],
     "chosen": [assistant("the music was wonderful .")], "rejected": [assistant("boring")]},
]


def trl_tokens(tok, rows, tmp_path):
    """TRL 1.16's own preprocessing (DPOTrainer._prepare_dataset), on the rows as a datasets.Dataset."""
    import datasets

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, bf16=False, use_cpu=True)
    trainer = types.SimpleNamespace(_tokenizer=tok, _is_vision_dataset=False)
    out = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tok, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_every_reply_is_tokenised_as_trl_tokenises_it_end_of_turn_included(name, tmp_path):
    tok = TOKENIZERS[name]()
    rows = [r for r in ROWS if name != "gemma" or r["prompt"][0]["role"] != "system"]  # Gemma has no system turn
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.0, max_length=4096), tok, seed=0)
    ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert ours == trl_tokens(tok, rows, tmp_path)
    end = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for _, chosen, rejected in ours:
        assert end in chosen[-2:] and end in rejected[-2:]  # the template's end of turn is trained
    assert stop_ids(tok)[0] == end and reply_end(tok)[0] == end  # and sampling stops there
    if name != "smollm2":
        assert tok.eos_token_id not in ours[0][1]  # EOS is not what this template ends a turn with


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_sft_and_kto_examples_end_their_reply_as_the_template_does(name, tmp_path):
    tok = TOKENIZERS[name]()
    rows = [ROWS[0]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (chosen, rejected), _, _ = build_completion_datasets(DataConfig(train=str(path), eval_fraction=0.0), tok, seed=0,
                                                         labelled=True)
    [(prompt_ids, chosen_ids, rejected_ids)] = trl_tokens(tok, rows, tmp_path)
    assert (chosen.prompt_ids, chosen.completion_ids) == (prompt_ids, chosen_ids)
    assert (rejected.prompt_ids, rejected.completion_ids) == (prompt_ids, rejected_ids)
