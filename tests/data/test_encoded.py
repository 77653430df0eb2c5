"""Tokenisation runs once per (rows, tokenizer, settings, code): `datasets.map` caches it on disk, so `lora-dpo
data`, `plan` and `train` of one recipe tokenise once; whatever changes the tokens maps again; several
processes give what one gives."""

from __future__ import annotations

import json

import pytest

from lora_dpo.config import DataConfig
from lora_dpo.data import encoded, examples, pairs
from lora_dpo.data.examples import build_completion_datasets
from lora_dpo.data.pairs import build_datasets
from tiny import chatml_tokenizer, llama3_tokenizer

ROWS = [{"prompt": f"question {k}: what is {k} + {k}?", "chosen": f"it is {2 * k}.", "rejected": f"maybe {k}."}
        for k in range(40)] + [{"prompt": "no reply", "chosen": "", "rejected": "x"}]


@pytest.fixture
def calls(monkeypatch):
    """How many rows each encoding function was called on (a map read from the cache calls none)."""
    seen = {"pairs": 0, "examples": 0}

    def counting(name, function):
        def wrapper(batch, indices, **kw):
            seen[name] += len(indices)
            return function(batch, indices, **kw)
        return wrapper

    monkeypatch.setattr(pairs, "_encode_pairs", counting("pairs", pairs._encode_pairs))
    monkeypatch.setattr(examples, "_encode_examples", counting("examples", examples._encode_examples))
    return seen


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def build(path, tokenizer, **kw):
    cfg = DataConfig(train=str(path), eval_fraction=0.0, on_bad_rows="skip", **kw)
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    return train, report


def test_a_second_build_of_the_same_data_reads_the_tokenised_cache(data, calls):
    tok = chatml_tokenizer()
    first, first_report = build(data, tok)
    assert calls["pairs"] == len(ROWS)
    again, again_report = build(data, chatml_tokenizer())  # a fresh load of the same tokenizer: same digest
    assert calls["pairs"] == len(ROWS)  # nothing tokenised again
    assert again == first and again_report == first_report
    assert first_report.malformed == {"chosen is empty": 1} and len(first) == 40


def test_a_new_max_length_reuses_the_cache_and_truncates_anew(data, calls):
    full, _ = build(data, chatml_tokenizer())
    short, report = build(data, chatml_tokenizer(), max_length=16, max_prompt_length=12)
    assert calls["pairs"] == len(ROWS)
    assert report.truncated_pairs > 0 and all(len(p.prompt_ids) + len(p.chosen_ids) <= 16 for p in short)
    assert [p.index for p in full][:3] == [0, 1, 2]


@pytest.mark.parametrize("change", ["tokenizer", "system_prompt", "code", "file"])
def test_what_changes_the_tokens_tokenises_again(data, calls, monkeypatch, change):
    build(data, chatml_tokenizer())
    tok, kw = chatml_tokenizer(), {}
    if change == "tokenizer":
        tok = llama3_tokenizer()
    elif change == "system_prompt":
        kw["system_prompt"] = "be brief"
    elif change == "code":
        monkeypatch.setattr(encoded, "code_digest", lambda: "another version of lora-dpo")
    else:
        data.write_text(data.read_text() + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    train, _ = build(data, tok, **kw)
    assert calls["pairs"] == 2 * len(ROWS) + (change == "file")
    if change == "system_prompt":
        assert train[0].prompt[0] == {"role": "system", "content": "be brief"}


def test_a_chat_template_edit_changes_the_tokenizer_digest():
    tok = chatml_tokenizer()
    before = encoded.tokenizer_digest(tok)
    assert encoded.tokenizer_digest(chatml_tokenizer()) == before
    tok("some text", padding="max_length", max_length=8, truncation=True)  # using it changes no digest
    assert encoded.tokenizer_digest(tok) == before
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert encoded.tokenizer_digest(tok) != before


def test_several_processes_tokenise_exactly_as_one(data, monkeypatch):
    single, single_report = build(data, chatml_tokenizer())
    monkeypatch.setattr(encoded, "processes", lambda rows: 2)
    monkeypatch.setattr(encoded, "code_digest", lambda: "not the cache of the single-process run")
    several, several_report = build(data, chatml_tokenizer())
    assert several == single and several_report == single_report


def test_single_completion_examples_are_cached_too(data, calls):
    cfg = DataConfig(train=str(data), eval_fraction=0.0, on_bad_rows="skip")
    first = build_completion_datasets(cfg, chatml_tokenizer(), seed=0, labelled=True)
    assert calls["examples"] == len(ROWS)
    again = build_completion_datasets(cfg, chatml_tokenizer(), seed=0, labelled=True)
    assert calls["examples"] == len(ROWS) and again[0] == first[0]
    assert len(first[0]) == 80 and sum(e.desirable for e in first[0]) == 40  # two unpaired examples per pair


def test_lora_dpo_data_twice_tokenises_once(data, calls, tiny_qwen2, tmp_path, capsys):
    from lora_dpo.cli.main import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name: {tiny_qwen2}}}\n"
                      f"data: {{train: {data}, on_bad_rows: skip}}\n")
    assert main(["data", str(recipe)]) == 0
    first = capsys.readouterr().out
    assert main(["data", str(recipe)]) == 0
    assert calls["pairs"] == len(ROWS) and capsys.readouterr().out == first
