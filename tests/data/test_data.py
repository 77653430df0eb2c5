"""lora_dpo.data (sources, formats, tokenize, pairs, batches, report): loading, format recognition, validation, tokenisation, truncation,
eval split, collation. Every dataset is written to tmp_path by the test; expected values are worked out by hand."""

from __future__ import annotations

import copy
import csv
import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lora_dpo.config import DataConfig, ModelConfig, Recipe
from lora_dpo.cli.data import inspect_data
from lora_dpo.data.batches import collate
from lora_dpo.data.formats import RowError, detect_format, normalise_row
from lora_dpo.data.pairs import EncodedPair, build_datasets
from lora_dpo.data.report import DataReport, length_stats, percentile
from lora_dpo import names
from lora_dpo.data.sources import load_rows
from lora_dpo.data.tokenize import encode_completion, encode_prompt, encode_reply
from lora_dpo.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def normalised(source, system_prompt=None) -> tuple[str, list[dict]]:
    """(format, normalised rows) of a file, through the public functions the builder uses."""
    rows = load_rows(str(source), "train")
    fmt = detect_format(rows.column_names, rows[0])
    return fmt, [normalise_row(r, fmt, system_prompt) for r in rows]


def config(train, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(train=str(train), **kw)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


STANDARD = [
    {"prompt": "capital of France?", "chosen": "Paris.", "rejected": "Rome.", "score": 3},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "score": 1},
]
STANDARD_NORMALISED = [
    {"prompt": "capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
]


# --------------------------------------------------------------------------------------- formats and files


def test_standard_format_normalises_and_ignores_extra_columns(tmp_path):
    fmt, rows = normalised(write_jsonl(tmp_path / "d.jsonl", STANDARD))
    assert fmt == "standard"
    assert rows == STANDARD_NORMALISED


def _write_json_array(path, rows):
    path.write_text(json.dumps(rows))


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize(
    "name, write",
    [("d.jsonl", write_jsonl), ("d.json", _write_json_array), ("d.csv", _write_csv), ("d.parquet", _write_parquet)],
)
def test_each_local_file_type_loads(tmp_path, name, write):
    write(tmp_path / name, STANDARD)
    fmt, rows = normalised(tmp_path / name)
    assert fmt == "standard"
    assert rows == STANDARD_NORMALISED


def test_compressed_jsonl_loads(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in STANDARD).encode()))
    assert normalised(path) == ("standard", STANDARD_NORMALISED)


def test_an_unsupported_file_type_is_an_error_naming_it(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("prompt chosen rejected")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type '\.txt'"):
        load_rows(str(path), "train")


def test_conversational_format_keeps_message_prompts(tmp_path):
    row = {
        "prompt": [system("Be brief."), user("hi"), assistant("hello"), user("capital of France?")],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("Rome.")],
    }
    fmt, rows = normalised(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert fmt == "conversational"
    assert rows == [{"prompt": row["prompt"], "chosen": "Paris.", "rejected": "Rome."}]


def test_conversational_strips_a_prompt_repeated_in_the_completions(tmp_path):
    # UltraFeedback-binarized: the prompt is a string, chosen/rejected repeat it as a user message
    rows = [
        {
            "prompt": "capital of France?",
            "chosen": [user("capital of France?"), assistant("Paris.")],
            "rejected": [user("capital of France?"), assistant("Rome.")],
            "messages": [user("capital of France?"), assistant("Paris.")],
        },
        {
            "prompt": "2 + 2?",
            "chosen": [user("2 + 2?"), assistant("4")],
            "rejected": [user("2 + 2?"), assistant("5")],
            "messages": [user("2 + 2?"), assistant("4")],
        },
    ]
    fmt, out = normalised(write_jsonl(tmp_path / "d.jsonl", rows))
    assert fmt == "conversational"
    assert out == [
        {"prompt": "capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
    ]
    # the same with a message-list prompt
    listed = {"prompt": [user("hi")], "chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]}
    assert normalise_row(listed, "conversational") == {"prompt": [user("hi")], "chosen": "a", "rejected": "b"}


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    shared = [user("hi"), assistant("hello"), user("capital of France?")]
    row = {"chosen": shared + [assistant("Paris.")], "rejected": shared + [assistant("Rome.")], "id": 7}
    fmt, rows = normalised(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert fmt == "implicit"
    assert rows == [{"prompt": shared, "chosen": "Paris.", "rejected": "Rome."}]


def test_hh_transcripts_parse_into_messages(tmp_path):
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: capital of France?\n\nAssistant: Rome.",
    }
    fmt, rows = normalised(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert fmt == "hh"
    assert rows == [
        {
            "prompt": [user("hi"), assistant("hello"), user("capital of France?")],
            "chosen": "Paris.",
            "rejected": "Rome.",
        }
    ]


def test_sharegpt_maps_speakers_and_keeps_the_system_turn(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "capital of France?"},
            ],
            "chosen": {"from": "gpt", "value": "Paris."},
            "rejected": {"from": "gpt", "value": "Rome."},
        }
    ]
    _write_json_array(tmp_path / "d.json", rows)
    fmt, out = normalised(tmp_path / "d.json")
    assert fmt == "sharegpt"
    expected_prompt = [system("Be brief."), user("hi"), assistant("hello"), user("capital of France?")]
    assert out == [{"prompt": expected_prompt, "chosen": "Paris.", "rejected": "Rome."}]


def test_sharegpt_accepts_role_content_keys_and_list_or_string_replies():
    row = {
        "conversations": [{"role": "user", "content": "hi"}],
        "chosen": [{"from": "gpt", "value": "a"}],
        "rejected": "b",
    }
    assert normalise_row(row, "sharegpt") == {"prompt": [user("hi")], "chosen": "a", "rejected": "b"}
    # a separate system column (LLaMA-Factory) becomes the system message
    row = {"conversations": [{"from": "human", "value": "hi"}], "chosen": "a", "rejected": "b", "system": "Be brief."}
    assert normalise_row(row, "sharegpt")["prompt"] == [system("Be brief."), user("hi")]


def test_system_prompt_is_prepended_only_where_there_is_none():
    plain = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    assert normalise_row(plain, "standard", "Be brief.")["prompt"] == [system("Be brief."), user("hi")]
    has_one = {"prompt": [system("Own."), user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    assert normalise_row(has_one, "conversational", "Be brief.")["prompt"] == [system("Own."), user("hi")]
    no_system = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    assert normalise_row(no_system, "conversational", "Be brief.")["prompt"] == [system("Be brief."), user("hi")]


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": "hi", "completion": "hello", "label": True}],
        [{"messages": [user("hi"), assistant("hello")], "label": False}],
    ],
)
def test_unpaired_kto_feedback_is_refused_with_its_columns(tmp_path, rows):
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets(config(path), None, seed=0)
    message = str(err.value)
    assert "unpaired (KTO) feedback" in message and "loss.name=kto" in message
    assert ", ".join(rows[0]) in message  # the columns found
    assert str(path) in message


def test_unknown_columns_error_names_the_columns_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        build_datasets(config(path), None, seed=0)
    message = str(err.value)
    assert "columns found: question, answer" in message
    assert "prompt/chosen/rejected" in message and "conversations/chosen/rejected" in message


# ------------------------------------------------------------------------------------------ malformed rows


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        ("standard", {"prompt": "p", "chosen": None, "rejected": "b"}, "chosen is missing"),
        (
            "standard",
            {"prompt": "p", "chosen": "a", "rejected": 5},
            "rejected is int, expected text or an assistant message",
        ),
        ("standard", {"prompt": "p", "chosen": "  \n", "rejected": "b"}, "chosen is empty"),
        ("standard", {"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
        ("standard", {"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
        (
            "conversational",
            {"prompt": [user("p")], "chosen": [assistant("a"), assistant("b")], "rejected": [assistant("c")]},
            "chosen has 2 messages after the prompt, expected one assistant reply",
        ),
        (
            "conversational",
            {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [user("c")]},
            "rejected is a 'user' message, expected an assistant reply",
        ),
        (
            "conversational",
            {"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("c")]},
            "prompt is empty",
        ),
        (
            "conversational",
            {"prompt": [user("p"), {"role": "user"}], "chosen": "a", "rejected": "b"},
            "prompt message 2 has no text content",
        ),
        (
            "hh",
            {"chosen": "hello there", "rejected": "\n\nHuman: p\n\nAssistant: b"},
            "chosen is not an Anthropic HH transcript",
        ),
        (
            "hh",
            {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "chosen and rejected have different prompts",
        ),
        ("hh", {"chosen": "\n\nHuman: p\n\nAssistant:", "rejected": "\n\nHuman: p\n\nAssistant: b"}, "chosen is empty"),
        (
            "implicit",
            {"chosen": [user("p"), assistant("a"), user("more")], "rejected": [user("p"), assistant("b")]},
            "chosen does not end with an assistant reply",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "function_call", "value": "x"}], "chosen": "a", "rejected": "b"},
            "conversations message 1 has an unsupported role 'function_call'",
        ),
    ],
)
def test_each_malformed_row_raises_its_reason(fmt, row, reason):
    with pytest.raises(RowError) as err:
        normalise_row(row, fmt)
    assert err.value.reason.startswith(reason)


def _rows_with_bad(bad: dict[int, dict], n: int) -> list[dict]:
    good = lambda i: {"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}  # noqa: E731
    return [bad.get(i, good(i)) for i in range(n)]


def test_malformed_rows_raise_one_error_naming_each_row(tmp_path, tok_chatml):
    bad = {2: {"prompt": "p", "chosen": "", "rejected": "b"}, 5: {"prompt": "p", "chosen": "x", "rejected": "x"}}
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad(bad, 8))
    with pytest.raises(DataError) as err:
        build_datasets(config(path), tok_chatml, seed=0)
    assert str(err.value) == (
        f"{path}: 2 malformed rows: row 2: chosen is empty; row 5: chosen and rejected are identical "
        "(set data.on_bad_rows=skip to skip them)"
    )


def test_malformed_rows_error_shows_five_then_counts_the_rest(tmp_path, tok_chatml):
    bad = {i: {"prompt": "p", "chosen": "", "rejected": "b"} for i in range(1, 9)}
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad(bad, 10))
    with pytest.raises(DataError) as err:
        build_datasets(config(path), tok_chatml, seed=0)
    message = str(err.value)
    assert message.startswith(f"{path}: 8 malformed rows: row 1: chosen is empty; row 2: chosen is empty;")
    assert "row 5: chosen is empty; and 3 more (set data.on_bad_rows=skip" in message
    assert "row 6" not in message


def test_skip_mode_drops_malformed_rows_and_counts_them_by_reason(tmp_path, tok_chatml):
    bad = {
        2: {"prompt": "p", "chosen": "", "rejected": "b"},
        3: {"prompt": "p", "chosen": "", "rejected": "c"},
        5: {"prompt": "p", "chosen": "x", "rejected": "x"},
    }
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad(bad, 8))
    train, evals, report = build_datasets(config(path, on_bad_rows="skip"), tok_chatml, seed=0)
    assert [p.index for p in train] == [0, 1, 4, 6, 7]
    assert evals == []
    assert report.malformed == {"chosen is empty": 2, "chosen and rejected are identical": 1}
    assert (report.rows_read, report.train_pairs, report.eval_pairs) == (8, 5, 0)
    assert "3 malformed skipped (2x chosen is empty; 1x chosen and rejected are identical)" in report.summary()


# -------------------------------------------------------------------------------------------- tokenisation


def test_chatml_prompt_and_completion_tokens_equal_the_full_rendered_chat(tmp_path, tok_chatml):
    row = {"prompt": "write a short review", "chosen": "the movie was great .", "rejected": "the plot was dull ."}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    [pair], _, _ = build_datasets(config(path), tok_chatml, seed=0)
    # the template's rendering of [user, assistant], worked out by hand from CHATML_TEMPLATE: the reply ends as the
    # template ends an assistant turn, <|im_end|> and a newline
    full = "<|im_start|>user\nwrite a short review<|im_end|>\n<|im_start|>assistant\nthe movie was great .<|im_end|>\n"
    assert pair.prompt_ids + pair.chosen_ids == tok_chatml(full, add_special_tokens=False)["input_ids"]
    prompt = "<|im_start|>user\nwrite a short review<|im_end|>\n<|im_start|>assistant\n"
    assert tok_chatml.decode(pair.prompt_ids) == prompt
    assert pair.chosen_ids[-2] == pair.rejected_ids[-2] == tok_chatml.eos_token_id
    assert tok_chatml.decode(pair.rejected_ids) == "the plot was dull .<|im_end|>\n"


def test_a_prompt_the_chat_template_refuses_is_a_malformed_row(tmp_path, tok_chatml):
    strict = copy.deepcopy(tok_chatml)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tok_chatml.chat_template
    )
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [system("Be brief."), user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"1 malformed row: row 1: the chat template rejected the prompt \(System role"):
        build_datasets(config(path), strict, seed=0)


def test_completion_ends_with_exactly_one_eos(tok_chatml):
    eos = tok_chatml.eos_token_id
    for text in ("Paris.", "Paris.<|im_end|>", "Paris.<|im_end|><|im_end|>"):
        ids = encode_completion(tok_chatml, text)
        assert ids.count(eos) == 1 and ids[-1] == eos
        assert ids == tok_chatml("Paris.", add_special_tokens=False)["input_ids"] + [eos]


def test_llama3_bos_appears_once(tmp_path, tok_llama3):
    bos = tok_llama3.bos_token_id
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}])
    [pair], _, _ = build_datasets(config(path), tok_llama3, seed=0)
    assert pair.prompt_ids[0] == bos
    assert (pair.prompt_ids + pair.chosen_ids).count(bos) == 1
    assert tok_llama3.decode(pair.prompt_ids + pair.chosen_ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    )


def test_tokenizer_without_chat_template_uses_plain_text(tmp_path, tok_plain):
    rows = [
        {"prompt": "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Rome."},
        {"prompt": [user("capital of France?")], "chosen": [assistant("Paris.")], "rejected": [assistant("Rome.")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows[:1])
    [pair], _, _ = build_datasets(config(path), tok_plain, seed=0)
    assert tok_plain.decode(pair.prompt_ids) == "Q: capital of France?\nA:"
    assert tok_plain.decode(pair.chosen_ids) == " Paris.</s>"
    # message lists are joined as plain turns
    assert tok_plain.decode(encode_prompt(tok_plain, [user("capital of France?")])) == (
        "user: capital of France?\n\nassistant: "
    )


def test_collate_concatenates_chosen_then_rejected_and_masks_completions_only():
    # hand-built: pad 0, EOS 2; lengths 5, 3 (chosen) and 4, 5 (rejected) -> T = 5
    pairs = [
        EncodedPair(index=7, prompt="a", prompt_ids=[11, 12], chosen_ids=[21, 22, 2], rejected_ids=[31, 2]),
        EncodedPair(index=3, prompt="b", prompt_ids=[13], chosen_ids=[23, 2], rejected_ids=[32, 33, 34, 2]),
    ]
    batch = collate(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [11, 12, 21, 22, 2],
        [13, 23, 2, 0, 0],
        [11, 12, 31, 2, 0],
        [13, 32, 33, 34, 2],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    T, F = True, False
    assert batch["loss_mask"].tolist() == [[F, F, T, T, T], [F, T, T, F, F], [F, F, T, T, F], [F, T, T, T, T]]
    assert batch["index"].tolist() == [7, 3]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["index"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool


def test_collate_of_built_pairs_masks_exactly_the_completion_tokens(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    train, _, _ = build_datasets(config(path), tok_chatml, seed=0)
    batch = collate(train, pad_id=tok_chatml.pad_token_id)
    for row, (pair, reply) in enumerate([(p, p.chosen_ids) for p in train] + [(p, p.rejected_ids) for p in train]):
        masked = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
        assert masked == reply
        assert batch["attention_mask"][row].sum() == len(pair.prompt_ids) + len(reply)


# -------------------------------------------------------------------------------------------------- length

LONG_PROMPT = "write a short review of the film night train . " * 4
LONG_REPLY = "the movie was great and the acting was wonderful . " * 3


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": LONG_REPLY, "rejected": "boring ."}])
    full_prompt, full_chosen = encode_reply(tok_chatml, LONG_PROMPT, LONG_REPLY)
    full_rejected = encode_reply(tok_chatml, LONG_PROMPT, "boring .")[1]
    assert len(full_prompt) > 10 and len(full_chosen) > 14 and len(full_rejected) <= 14  # premises
    [pair], _, report = build_datasets(config(path, max_length=24, max_prompt_length=10), tok_chatml, seed=0)
    assert pair.prompt_ids == full_prompt[-10:]  # cut from the left to max_prompt_length
    assert tok_chatml.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert pair.chosen_ids == full_chosen[:14]  # 24 - 10: cut from the right, so no end of turn
    assert pair.chosen_ids[-1] != tok_chatml.eos_token_id
    assert pair.rejected_ids == full_rejected  # fits, untouched
    assert (report.truncated_prompts, report.truncated_completions, report.dropped_for_length) == (1, 1, 0)


def test_a_pair_that_fits_max_length_is_never_cut(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": "great .", "rejected": "dull ."}])
    prompt, chosen = encode_reply(tok_chatml, LONG_PROMPT, "great .")
    fits = len(prompt) + len(chosen) + 1  # the rejected reply is no longer
    assert len(prompt) > fits // 2  # premise: the prompt is longer than the default max_prompt_length
    [pair], _, report = build_datasets(config(path, max_length=fits), tok_chatml, seed=0)
    assert (pair.prompt_ids, pair.chosen_ids) == (prompt, chosen)
    assert (report.truncated_pairs, report.truncated_prompts, report.truncated_completions) == (0, 0, 0)


def test_a_long_prompt_loses_only_what_the_longest_reply_needs(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": "great .", "rejected": "dull ."}])
    prompt, chosen = encode_reply(tok_chatml, LONG_PROMPT, "great .")
    [pair], _, report = build_datasets(config(path, max_length=30), tok_chatml, seed=0)
    assert len(prompt) + len(chosen) > 30 and 30 - len(chosen) > 15  # premises: too long; the reply leaves > 15
    assert pair.prompt_ids == prompt[-(30 - len(chosen)):] and pair.chosen_ids == chosen
    assert (report.truncated_prompts, report.truncated_completions, report.max_prompt_length) == (1, 0, 15)


def test_with_long_replies_the_prompt_keeps_max_prompt_length_half_of_max_length_by_default(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": LONG_REPLY, "rejected": "dull ."}])
    prompt, chosen = encode_reply(tok_chatml, LONG_PROMPT, LONG_REPLY)
    [pair], _, _ = build_datasets(config(path, max_length=30), tok_chatml, seed=0)
    assert pair.prompt_ids == prompt[-15:] and pair.chosen_ids == chosen[:15]


def test_keep_start_keeps_the_whole_prompt_and_drops_a_pair_it_fills(tmp_path, tok_chatml):
    rows = [{"prompt": LONG_PROMPT, "chosen": LONG_REPLY, "rejected": "dull ."},
            {"prompt": LONG_PROMPT * 3, "chosen": "great .", "rejected": "dull ."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prompt, chosen = encode_reply(tok_chatml, LONG_PROMPT, LONG_REPLY)
    assert len(encode_prompt(tok_chatml, LONG_PROMPT * 3)) >= 80 > len(prompt) + 5  # premises
    assert len(prompt) + len(chosen) > 80
    [pair], _, report = build_datasets(config(path, max_length=80, truncation="keep_start"), tok_chatml, seed=0)
    assert pair.prompt_ids == prompt and pair.chosen_ids == chosen[: 80 - len(prompt)]
    assert (report.truncated_prompts, report.dropped_for_length) == (0, 1)


def test_truncated_llama3_prompt_keeps_its_bos(tmp_path, tok_llama3):
    bos = tok_llama3.bos_token_id
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": LONG_REPLY, "rejected": "dull ."}])
    [pair], _, _ = build_datasets(config(path, max_length=24, max_prompt_length=10), tok_llama3, seed=0)
    full = encode_prompt(tok_llama3, LONG_PROMPT)
    assert pair.prompt_ids == [bos] + full[-9:]
    assert pair.prompt_ids.count(bos) == 1


def test_pairs_that_become_identical_when_cut_are_dropped_and_counted(tmp_path, tok_chatml):
    rows = [
        {"prompt": "review", "chosen": LONG_REPLY + "yes", "rejected": LONG_REPLY + "no"},  # differ only at the end
        {"prompt": "review", "chosen": "great .", "rejected": "dull ."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = build_datasets(config(path, max_length=24, max_prompt_length=12), tok_chatml, seed=0)
    assert [p.index for p in train] == [1]
    assert report.dropped_for_length == 1
    assert report.truncated_completions == 0  # the dropped pair's cuts are not counted
    assert "1 pairs dropped for length (max_length=24)" in report.summary()


def test_a_prompt_that_leaves_no_room_for_a_completion_is_dropped(tmp_path, tok_chatml):
    rows = [
        {"prompt": LONG_PROMPT, "chosen": "great .", "rejected": "dull ."},
        {"prompt": "hi", "chosen": "great .", "rejected": "dull ."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # max_prompt_length == max_length: a prompt cut to 16 tokens leaves a completion budget of 0
    train, _, report = build_datasets(config(path, max_length=16, max_prompt_length=16), tok_chatml, seed=0)
    assert [p.index for p in train] == [1]
    assert report.dropped_for_length == 1


def test_all_pairs_dropped_for_length_is_an_error_suggesting_a_larger_max_length(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": LONG_PROMPT, "chosen": "great .", "rejected": "dull ."}])
    with pytest.raises(DataError, match=r"no training pairs left: .*1 pairs dropped for length .*raise data\.max_length"):
        build_datasets(config(path, max_length=8, max_prompt_length=8), tok_chatml, seed=0)


# ------------------------------------------------------------------------------------ sources and eval split


def _folder_with_splits(tmp_path) -> Path:
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _rows_with_bad({}, 6))
    write_jsonl(folder / "test.jsonl", [{"prompt": "held out?", "chosen": "yes", "rejected": "no"}] * 2)
    return folder


def test_eval_split_by_name_reads_that_split_of_the_train_source(tmp_path, tok_chatml):
    folder = _folder_with_splits(tmp_path)
    train, evals, report = build_datasets(config(folder, eval="test"), tok_chatml, seed=0)
    assert [p.index for p in train] == list(range(6))
    assert [p.index for p in evals] == [0, 1] and evals[0].prompt == "held out?"
    assert (report.train_pairs, report.eval_pairs, report.rows_read) == (6, 2, 8)
    assert report.eval_from == f"from {folder} [test]"


def test_eval_split_that_does_not_exist_lists_the_available_splits(tmp_path, tok_chatml):
    folder = _folder_with_splits(tmp_path)
    with pytest.raises(DataError, match=r"^data.eval=validation names a split of data.train that it lacks: .*"
                                         r"no split 'validation'; available splits: train, test; set data.eval"):
        build_datasets(config(folder, eval="validation"), tok_chatml, seed=0)
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    with pytest.raises(DataError, match=r"d.jsonl: no split 'test'; available splits: train$"):
        load_rows(str(path), "test")


def test_eval_from_another_file_reads_its_train_split(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "other?", "chosen": "yes", "rejected": "no"}])
    train, evals, report = build_datasets(config(path, eval=str(other)), tok_chatml, seed=0)
    assert len(train) == 2 and [p.prompt for p in evals] == ["other?"]
    assert report.eval_from == f"from {other} [train]"


def test_eval_fraction_holds_out_a_seeded_disjoint_share(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad({}, 20))
    train, evals, report = build_datasets(config(path, eval_fraction=0.25), tok_chatml, seed=1)
    train_idx, eval_idx = [p.index for p in train], [p.index for p in evals]
    assert len(eval_idx) == 5 and len(train_idx) == 15  # round(0.25 * 20)
    assert sorted(train_idx + eval_idx) == list(range(20))
    again, again_eval, _ = build_datasets(config(path, eval_fraction=0.25), tok_chatml, seed=1)
    assert [p.index for p in again_eval] == eval_idx and [p.index for p in again] == train_idx
    other_seeds = [build_datasets(config(path, eval_fraction=0.25), tok_chatml, seed=s)[1] for s in (2, 3)]
    assert any([p.index for p in held] != eval_idx for held in other_seeds)  # the seed matters
    assert (report.train_pairs, report.eval_pairs) == (15, 5)


def test_eval_fraction_holds_out_at_least_one_pair_and_zero_disables_it(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad({}, 3))
    train, evals, _ = build_datasets(config(path, eval_fraction=0.01), tok_chatml, seed=0)
    assert (len(train), len(evals)) == (2, 1)
    train, evals, report = build_datasets(config(path, eval_fraction=0.0), tok_chatml, seed=0)
    assert (len(train), len(evals)) == (3, 0)
    assert "3 train, 0 eval (no eval)" in report.summary()


def test_max_rows_limits_the_training_rows_read(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_bad({}, 10))
    train, _, report = build_datasets(config(path, max_rows=4), tok_chatml, seed=0)
    assert [p.index for p in train] == [0, 1, 2, 3]
    assert report.rows_read == 4


@pytest.mark.parametrize("name", ["missing.jsonl", "nowhere/at/all", "./data"])
def test_a_missing_local_file_is_an_error_naming_the_path(tmp_path, name):
    path = str(tmp_path / name) if not name.startswith(".") else name + "/missing.csv"
    with pytest.raises(DataError, match=f"^{path}: no such file or folder$"):
        load_rows(path, "train")


def test_a_hub_dataset_that_cannot_be_loaded_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/nonexistent' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load dataset 'someone/nonexistent' from the Hugging Face Hub"):
        load_rows("someone/nonexistent", "train")


def test_toy_source_reads_the_toy_data_files(tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", STANDARD)
    test = write_jsonl(tmp_path / "test.jsonl", STANDARD[:1])
    names.load_plugins()  # (the real toy world registers itself first; this one replaces it)
    monkeypatch.setitem(names.REGISTRY["data"], "toy", lambda: {"train": str(train), "test": str(test)})
    assert len(load_rows("toy", "train")) == 2 and len(load_rows("toy", "test")) == 1


def test_report_to_dict_and_summary(tmp_path, tok_chatml):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    _, _, report = build_datasets(config(path), tok_chatml, seed=0)
    assert isinstance(report, DataReport)
    d = report.to_dict()
    assert d["source"] == str(path) and d["formats"] == {"standard": 2} and d["malformed"] == {}
    assert (d["rows_read"], d["train_pairs"], d["eval_pairs"], d["dropped_for_length"]) == (2, 2, 0, 0)
    summary = report.summary()
    assert summary.startswith(f"data: 2 rows (standard) from {path}, 0 malformed, 0 pairs dropped for length")
    assert 2 <= len(summary.splitlines()) <= 4


@pytest.mark.skipif(not (SHARED_DATA / "dpo_en_demo.json").is_file(), reason="shared demo data not present")
def test_real_sharegpt_demo_file_loads_with_multi_turn_prompts(tok_chatml):
    cfg = config(SHARED_DATA / "dpo_en_demo.json", max_length=100_000)  # no truncation: every turn is kept
    train, evals, report = build_datasets(cfg, tok_chatml, seed=0)
    assert (report.rows_read, report.formats, report.malformed, len(train)) == (300, {"sharegpt": 300}, {}, 300)
    # counted in the file: 106 rows have earlier turns before the last question, 80 a system turn
    multi = [p for p in train if sum(m["role"] == "user" for m in p.prompt) > 1]
    assert len(multi) == 106
    assert sum(p.prompt[0]["role"] == "system" for p in train) == 80
    for pair in multi:
        roles = [m["role"] for m in pair.prompt]
        assert roles[-1] == "user" and roles[1] == "assistant"  # user, assistant, ..., user
        # the earlier turns are in the tokens the model sees
        assert pair.prompt[1]["content"][-20:] in tok_chatml.decode(pair.prompt_ids)


# ------------------------------------------------------------------------------------------- data report
# With tok_plain (no chat template, no BOS) "Z" and "X" are single tokens that the tiny BPE never merges (no Z
# or X in its corpus), so a prompt of n letters is n tokens and a completion of n letters n + 1 (its EOS).


def z(n: int) -> str:
    return "Z" * n


def x(n: int) -> str:
    return "X" * n


def test_z_and_x_letters_are_one_token_each(tok_plain):  # the premise of the report tests below
    assert encode_prompt(tok_plain, z(5)) == [tok_plain.convert_tokens_to_ids("Z")] * 5
    assert len(encode_prompt(tok_plain, x(2))) == 2
    assert len(encode_completion(tok_plain, z(10) + "X")) == 12


# row: prompt P letters, chosen C, rejected R -> tokens P, C + 1, R + 1; "sequence" = P + max(C, R) + 1
REPORT_ROWS = [
    {"prompt": z(2), "chosen": z(3), "rejected": x(1)},  # 0: 2, 4, 2, seq 6; chosen longer
    {"prompt": z(4), "chosen": z(5), "rejected": x(2)},  # 1: 4, 6, 3, seq 10; chosen longer
    {"prompt": z(2), "chosen": z(3), "rejected": x(1)},  # 2: a duplicate of row 0
    {"prompt": z(1), "chosen": "", "rejected": x(1)},  # 3: malformed (chosen is empty), skipped, not measured
    {"prompt": z(6), "chosen": z(2), "rejected": x(2)},  # 4: 6, 3, 3, seq 9; equal length
    {"prompt": z(3), "chosen": z(1), "rejected": x(4)},  # 5: 3, 2, 5, seq 8; rejected longer
    # 6: 2, 13, 12, seq 15; chosen longer; the budget of 12 - 2 = 10 cuts both to Z*10: identical, dropped
    {"prompt": z(2), "chosen": z(12), "rejected": z(10) + "X"},
    {"prompt": z(5), "chosen": z(4), "rejected": x(6)},  # 7: 5, 5, 7, seq 12 = max_length: fits whole
]
# the 7 valid rows (all but 3), sorted; nearest-rank p50 of 7 is the 4th value, p90 and p99 the 7th
#   prompt   2 2 2 3 4 5 6     -> p50 3, p90 6, p99 6, max 6, mean 24/7
#   chosen   2 3 4 4 5 6 13    -> p50 4, p90 13,            mean 37/7
#   rejected 2 2 3 3 5 7 12    -> p50 3, p90 12,            mean 34/7
#   sequence 6 6 8 9 10 12 15  -> p50 9, p90 15,            mean 66/7
# chosen longer in rows 0 1 2 6 (4/7), rejected longer in 5 7 (2/7), equal in 4 (1/7)


def _report(tmp_path, tok, rows=REPORT_ROWS, **kw) -> DataReport:
    kw = {"max_length": 12, "max_prompt_length": 6, "on_bad_rows": "skip", **kw}
    path = write_jsonl(tmp_path / "report.jsonl", rows)
    return build_datasets(config(path, **kw), tok, seed=0)[2]


def flat(text: str) -> str:
    return " ".join(text.split())  # format() wraps long warnings; compare the words


def test_percentile_is_nearest_rank():
    ten = list(range(1, 11))
    assert [percentile(ten, p) for p in (1, 10, 50, 90, 91, 99, 100)] == [1, 1, 5, 9, 10, 10, 10]
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in (50, 90, 99)] == [50, 90, 99]
    assert percentile([7], 50) == percentile([7], 99) == 7
    assert length_stats([3, 1, 2, 10]) == {"p50": 2, "p90": 10, "p99": 10, "max": 10, "mean": 4.0}


def test_report_counts_and_token_length_percentiles_match_hand_counts(tmp_path, tok_plain):
    report = _report(tmp_path, tok_plain)
    assert (report.rows_read, report.formats, report.malformed) == (8, {"standard": 8}, {"chosen is empty": 1})
    assert (report.dropped_for_length, report.truncated_pairs, report.train_pairs) == (1, 0, 6)
    assert report.stats_rows == 7
    assert report.lengths == {
        "prompt": {"p50": 3, "p90": 6, "p99": 6, "max": 6, "mean": round(24 / 7, 2)},
        "chosen": {"p50": 4, "p90": 13, "p99": 13, "max": 13, "mean": round(37 / 7, 2)},
        "rejected": {"p50": 3, "p90": 12, "p99": 12, "max": 12, "mean": round(34 / 7, 2)},
        "sequence": {"p50": 9, "p90": 15, "p99": 15, "max": 15, "mean": round(66 / 7, 2)},
    }
    shares = (report.chosen_longer_share, report.rejected_longer_share, report.equal_length_share)
    assert shares == (4 / 7, 2 / 7, 1 / 7)
    assert report.duplicates == 1
    assert report.eval_in_train == 0
    json.dumps(report.to_dict())  # data_report.json


def test_length_figures_cover_the_training_source_before_the_eval_hold_out(tmp_path, tok_plain):
    held_out = _report(tmp_path, tok_plain, eval_fraction=0.5)
    assert (held_out.train_pairs, held_out.eval_pairs) == (3, 3)
    whole = _report(tmp_path, tok_plain)
    assert (held_out.lengths, held_out.stats_rows, held_out.duplicates) == (whole.lengths, 7, 1)


def test_rows_of_a_separate_eval_file_are_counted_but_not_measured(tmp_path, tok_plain):
    train = write_jsonl(tmp_path / "train.jsonl", REPORT_ROWS[:2])
    other = write_jsonl(tmp_path / "eval.jsonl", [REPORT_ROWS[0], {"prompt": z(9), "chosen": z(9), "rejected": x(1)}])
    report = build_datasets(config(train, eval=str(other), max_length=100), tok_plain, seed=0)[2]
    assert (report.rows_read, report.stats_rows) == (4, 2)
    assert report.lengths["prompt"]["max"] == 4  # the eval file's 9-token prompt is not in the figures
    assert report.eval_in_train == 1  # its first row is training row 0
    assert any("1 eval pair also in the training pairs" in w for w in report.warnings())


def test_prompt_lengths_include_the_chat_template(tmp_path, tok_chatml):
    rows = [{"prompt": "write a short review", "chosen": "great .", "rejected": "dull ."}]
    report = _report(tmp_path, tok_chatml, rows=rows, max_length=100, max_prompt_length=None)
    rendered = len(encode_prompt(tok_chatml, "write a short review"))
    assert rendered > len(tok_chatml("write a short review")["input_ids"])  # premise: the template adds tokens
    assert report.lengths["prompt"]["max"] == rendered
    assert report.lengths["sequence"]["max"] == rendered + len(encode_reply(tok_chatml, "write a short review", "great .")[1])


def test_format_shows_each_figure_and_the_warnings_that_apply(tmp_path, tok_plain):
    text = _report(tmp_path, tok_plain).format()
    lines = [flat(line) for line in text.splitlines()]
    for expected in [
        "read 8 rows standard: 8",
        "malformed, skipped 1 row 1x chosen is empty",
        "dropped for length 1 pair 14% of 7 valid pairs; max_length=12, max_prompt_length=6",
        "exact duplicates 1 pair counted, not removed",
        "training pairs 6 pairs",
        "prompt 3 6 6 6 3.4",
        "chosen 4 13 13 13 5.3",
        "rejected 3 12 12 12 4.9",
        "prompt+completion 9 15 15 15 9.4",
        "chosen longer 57% 4 of 7 pairs",
        "rejected longer 29% 2 of 7 pairs",
        "equal length 14% 1 of 7 pairs",
    ]:
        assert expected in lines, expected
    words = flat(text)
    assert "1 malformed row skipped (data.on_bad_rows=skip): 1x chosen is empty" in words
    assert "DPO can learn to prefer length rather than quality" in words
    assert "1 exact duplicate pair (same prompt, chosen and rejected as an earlier row): counted, not removed" in words
    assert "14% of pairs were dropped (1) or truncated (0)" in words
    assert "set data.max_length=15 and data.max_prompt_length=6" in words  # p99 of sequence and of prompt
    assert all(len(line) <= 100 for line in text.splitlines())


def test_format_has_no_warnings_for_clean_balanced_data(tmp_path, tok_plain):
    rows = [
        {"prompt": z(2), "chosen": z(3), "rejected": x(1)},  # chosen longer
        {"prompt": z(2), "chosen": z(1), "rejected": x(3)},  # rejected longer
        {"prompt": z(3), "chosen": z(2), "rejected": x(2)},  # equal
        {"prompt": z(4), "chosen": z(1), "rejected": x(1)},  # equal
    ]
    report = _report(tmp_path, tok_plain, rows=rows)
    assert (report.chosen_longer_share, report.rejected_longer_share, report.equal_length_share) == (0.25, 0.25, 0.5)
    assert report.warnings() == []
    text = report.format()
    assert "warnings: none" in text
    assert "DPO can learn" not in text and "duplicate pair" not in text and "skipped (data" not in text


def _bare_report(**kw) -> DataReport:
    fields = dict(source="d.jsonl", rows_read=20, formats={"standard": 20}, malformed={}, dropped_for_length=0,
                  truncated_prompts=0, truncated_completions=0, train_pairs=20, eval_pairs=0, stats_rows=20)
    return DataReport(**{**fields, **kw})


@pytest.mark.parametrize(
    "chosen, rejected, equal, warns",
    [
        (0.7, 0.3, 0.0, True),  # chosen longer in more than 60%
        (0.35, 0.65, 0.0, True),  # in less than 40%
        (0.6, 0.4, 0.0, False),  # at the threshold
        (0.45, 0.55, 0.0, False),
        (0.3, 0.3, 0.4, False),  # under 40% only because of ties: length does not tell the replies apart
        (0.5, 0.1, 0.4, True),  # chosen longer five times as often as shorter
    ],
)
def test_length_bias_warning_threshold(chosen, rejected, equal, warns):
    report = _bare_report(chosen_longer_share=chosen, rejected_longer_share=rejected, equal_length_share=equal)
    assert any("prefer length rather than quality" in w for w in report.warnings()) == warns


@pytest.mark.parametrize("dropped, truncated, warns", [(1, 0, False), (0, 1, False), (1, 1, True), (0, 2, True)])
def test_cut_pairs_warning_above_five_percent(dropped, truncated, warns):
    report = _bare_report(dropped_for_length=dropped, truncated_pairs=truncated)  # of 20 valid pairs
    assert any("dropped" in w for w in report.warnings()) == warns


def test_summary_stays_short_and_mentions_length_bias_and_warnings(tmp_path, tok_plain):
    summary = _report(tmp_path, tok_plain).summary()
    assert 2 <= len(summary.splitlines()) <= 4
    assert "prompt+completion p50 9, p99 15, max 15; chosen longer in 57% of pairs, 1 exact duplicate" in summary
    assert "4 warnings (see lora-dpo data)" in summary


def test_no_pairs_left_error_gives_the_token_lengths(tmp_path, tok_plain):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": z(9), "chosen": z(3), "rejected": x(1)}])
    expected = r"prompt\+completion is 13 tokens at the median, 13 at p99: raise data\.max_length"
    with pytest.raises(DataError, match=expected):
        build_datasets(config(path, max_length=8, max_prompt_length=8), tok_plain, seed=0)


def test_inspect_data_loads_the_recipe_tokenizer_and_reports(tmp_path, tok_plain):
    tok_plain.save_pretrained(tmp_path / "model")
    path = write_jsonl(tmp_path / "report.jsonl", REPORT_ROWS)
    data = config(path, max_length=12, max_prompt_length=6, on_bad_rows="skip", eval_fraction=0.25)
    recipe = Recipe(output_dir=str(tmp_path / "run"), model=ModelConfig(name=str(tmp_path / "model")), data=data)
    report = inspect_data(recipe)
    assert report.to_dict() == build_datasets(data, tok_plain, seed=recipe.train.seed)[2].to_dict()
    assert report.eval_from == f"0.25 of train held out, seed {recipe.train.seed}"
    assert not (tmp_path / "run").exists()  # a report, not a run


def test_a_save_to_disk_folder_is_read_with_its_splits(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one"), "train")["prompt"] == [r["prompt"] for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "two"))
    assert len(load_rows(str(tmp_path / "two"), "train")) == 3 and len(load_rows(str(tmp_path / "two"), "test")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        load_rows(str(tmp_path / "two"), "validation")
