"""Single-completion data for SFT and KTO: formats, labels, tokenisation, the KL examples of KTO."""

import json
from pathlib import Path

import pytest

from lora_dpo.data.batches import collate_completions
from lora_dpo.data.examples import build_completion_datasets, detect_single_format, mismatched
from lora_dpo.config import DataConfig
from lora_dpo.data.tokenize import encode_prompt, encode_reply
from lora_dpo.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(path, tok, labelled, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return build_completion_datasets(DataConfig(train=str(path), **kw), tok, seed=0, labelled=labelled)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("rows, fmt", [
    ([{"prompt": "hi", "completion": "hello", "label": True}], "prompt_completion"),
    ([{"messages": [user("hi"), assistant("hello")], "label": True}], "messages"),
    ([{"instruction": "greet", "input": "", "output": "hello"}], "alpaca"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}], "sharegpt_single"),
    ([{"prompt": "hi", "chosen": "hello", "rejected": "go away"}], "pairs:standard"),
])  # fmt: skip
def test_single_completion_formats_are_recognised(rows, fmt, tmp_path, tok_chatml):
    assert detect_single_format(list(rows[0]), rows[0]) == fmt
    train, _, report = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=False)
    ex = train[0]
    # the reply as the template writes it after the prompt, end of turn included, as preference data
    assert ex.completion_ids == encode_reply(tok_chatml, "hi" if fmt != "alpaca" else "greet", "hello")[1]
    assert tok_chatml.decode(ex.completion_ids) == "hello<|im_end|>\n"
    assert report.formats == {fmt: 1} and report.unit == "example"


def test_prompt_and_completion_tokenise_as_preference_data(tmp_path, tok_chatml):
    rows = [{"messages": [{"role": "system", "content": "be kind"}, user("hi"), assistant("hello")], "label": True},
            {"messages": [user("hi"), assistant("go away")], "label": False}]
    (ex, bad), _, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)
    assert bad.desirable is False
    assert ex.prompt_ids == encode_prompt(tok_chatml, [{"role": "system", "content": "be kind"}, user("hi")])
    assert ex.desirable is True
    batch = collate_completions([ex], tok_chatml.pad_token_id)
    n = len(ex.prompt_ids)
    assert batch["loss_mask"][0].tolist() == [False] * n + [True] * len(ex.completion_ids)


def test_kto_splits_a_preference_pair_into_two_unpaired_examples(tmp_path, tok_chatml):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    train, _, report = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)
    assert [e.desirable for e in train] == [True, False] * 4
    assert report.labels == {"desirable": 4, "undesirable": 4}
    sft, _, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=False)
    assert len(sft) == 4 and all(e.desirable for e in sft)  # SFT imitates the chosen replies only


def test_sft_skips_thumbs_down_examples_and_says_so(tmp_path, tok_chatml):
    rows = [{"prompt": "a", "completion": "yes", "label": True}, {"prompt": "b", "completion": "no", "label": False}]
    train, _, report = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=False)
    assert len(train) == 1 and report.malformed == {"undesirable (label false): not imitated by SFT": 1}


def test_kto_without_labels_is_refused_naming_the_columns(tmp_path, tok_chatml):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "yes"}])
    with pytest.raises(DataError, match=r"KTO needs a good/bad `label` column .* columns found: prompt, completion"):
        build(path, tok_chatml, labelled=True)


def test_a_bad_label_names_its_row(tmp_path, tok_chatml):
    rows = [{"prompt": "a", "completion": "yes", "label": True}, {"prompt": "b", "completion": "no", "label": "maybe"}]
    with pytest.raises(DataError, match=r"1 malformed row\(s\): row 1: label is 'maybe', expected true or false"):
        build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)


def test_kto_needs_both_labels(tmp_path, tok_chatml):
    rows = [{"prompt": "a", "completion": "yes", "label": True}, {"prompt": "b", "completion": "ok", "label": True}]
    with pytest.raises(DataError, match="no undesirable examples"):
        build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)


def test_held_out_rows_keep_both_examples_of_a_pair_together(tmp_path, tok_chatml):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    train, evals, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True, eval_fraction=0.2)
    assert len(evals) == 8 and not {e.index for e in evals} & {e.index for e in train}


def test_mismatched_examples_never_answer_their_own_rows_prompt(tmp_path, tok_chatml):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    train, _, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)  # [g0, b0, g1, b1, g2, b2]
    shifted = mismatched(train, max_length=1024)
    by_ids = {tuple(e.completion_ids): e.index for e in train}
    assert all(by_ids[tuple(s.completion_ids)] != e.index for e, s in zip(train, shifted))
    assert shifted[0].completion_ids == train[2].completion_ids  # g0's prompt gets g1, not its own b0


def test_mismatched_examples_pair_each_prompt_with_the_next_completion_of_its_label(tmp_path, tok_chatml):
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(3)]
    train, _, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)  # labels: good, bad, good
    shifted = mismatched(train, max_length=1024)
    assert [s.prompt_ids for s in shifted] == [e.prompt_ids for e in train]
    # good 0 -> good 2; bad 1 has no other bad example -> the next of another row, good 2; good 2 -> good 0
    assert [s.completion_ids for s in shifted] == [train[2].completion_ids, train[2].completion_ids,
                                                   train[0].completion_ids]


def test_pairs_in_file_order_lend_the_kl_examples_good_and_bad_completions_alike(tmp_path, tok_chatml):
    """Evaluation reads pair-derived examples in file order (good, bad, good, bad ...): the KL reference point must
    not be estimated on good completions alone."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    train, _, _ = build(write(tmp_path / "d.jsonl", rows), tok_chatml, labelled=True)
    shifted = mismatched(train, max_length=1024)
    label_of = {tuple(e.completion_ids): e.desirable for e in train}
    assert [label_of[tuple(s.completion_ids)] for s in shifted] == [e.desirable for e in train]


@pytest.mark.skipif(not (SHARED_DATA / "kto_en_demo.json").is_file(), reason="shared demo data not present")
def test_the_kto_demo_file_reads_as_unpaired_feedback(tok_chatml):
    train, _, report = build(SHARED_DATA / "kto_en_demo.json", tok_chatml, labelled=True, max_length=100_000)
    assert report.rows_read == 300 and report.formats == {"messages": 300}
    assert report.labels == {"desirable": 150, "undesirable": 150} and len(train) == 300
