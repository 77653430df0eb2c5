"""lora_dpo.compare and `lora-dpo compare`: the reference pane is the base with the adapter really off, the
tuned pane the base with the adapter on, both sampled from one seed; each answer's reward is
beta * (log pi_adapter - log pi_base) of that answer, checked against plain transformers + peft."""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from lora_dpo.cli import main
from lora_dpo.compare import Comparer, Sampling, read_prompts
from lora_dpo.compare.comparer import Adapter, Row, format_rows
from lora_dpo.config import ModelConfig
from lora_dpo.data.tokenize import encode_reply
from lora_dpo.errors import UserError
from lora_dpo.model.sampling import generate
from lora_dpo.model.load import load_base_model

PROMPTS = ["write a short review of the film night train .", "is it good ?", "what is the capital of France?"]
SAMPLING = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)


@pytest.fixture(scope="module")
def comparer(strong_adapter):
    return Comparer.load([str(strong_adapter)], device="cpu", log=lambda m: None)


def plain_models(base, adapter):
    """The base as Comparer loads a bare adapter's base (4-bit NF4 on the CPU), and base + adapter by peft."""
    plain = load_base_model(ModelConfig(name=str(base)), torch.device("cpu")).eval()
    tuned = PeftModel.from_pretrained(load_base_model(ModelConfig(name=str(base)), torch.device("cpu")), str(adapter))
    return plain, tuned.eval()


def logp(model, tok, prompt, answer):
    """Summed log-prob of the answer tokens (the end of turn included), from full logits: the independent reference."""
    p, c = encode_reply(tok, prompt, answer)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logits[torch.arange(len(targets)), targets][len(p) - 1 :].sum().item()


def test_reference_pane_is_the_base_and_tuned_pane_the_adapter(comparer, strong_adapter, tiny_qwen2):
    rows = comparer.compare(PROMPTS, SAMPLING)
    assert comparer.panes == ["reference", "tuned"]
    plain, tuned = plain_models(tiny_qwen2, strong_adapter)
    tok = AutoTokenizer.from_pretrained(strong_adapter)
    settings = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert [r.answers["reference"] for r in rows] == generate(plain, tok, PROMPTS, **settings)
    assert [r.answers["tuned"] for r in rows] == generate(tuned, tok, PROMPTS, **settings)
    assert any(r.answers["reference"] != r.answers["tuned"] for r in rows)  # the adapter changes the answers


def test_rewards_are_beta_times_log_ratio_under_the_adapter(comparer, strong_adapter, tiny_qwen2):
    rows = comparer.compare(PROMPTS[:2], SAMPLING)
    plain, tuned = plain_models(tiny_qwen2, strong_adapter)
    tok = AutoTokenizer.from_pretrained(strong_adapter)
    assert comparer.adapters[0].beta == 0.1  # a bare adapter folder: the default beta
    for row in rows:
        for pane in ("reference", "tuned"):
            answer = row.answers[pane]
            expected = 0.1 * (logp(tuned, tok, row.prompt, answer) - logp(plain, tok, row.prompt, answer))
            assert row.rewards[pane] == pytest.approx(expected, abs=2e-4), (pane, answer)
        assert row.score_with == "tuned"


def test_two_adapters_compare_a_with_b(strong_adapter, other_adapter, comparer):
    ab = Comparer.load([str(strong_adapter), str(other_adapter)], device="cpu", log=lambda m: None)
    assert ab.panes == ["A", "B"]
    rows = ab.compare(PROMPTS, SAMPLING)
    single = comparer.compare(PROMPTS, SAMPLING)
    assert [r.answers["A"] for r in rows] == [r.answers["tuned"] for r in single]  # A alone = A beside B
    assert [r.answers["A"] for r in rows] != [r.answers["B"] for r in rows]
    under_b = ab.compare(PROMPTS, SAMPLING, score_with="B")
    assert [r.answers["B"] for r in under_b] == [r.answers["B"] for r in rows]
    assert [r.rewards["B"] for r in under_b] != [r.rewards["B"] for r in rows]  # B's answers, scored by B
    with pytest.raises(UserError, match="score_with"):
        ab.compare(PROMPTS, SAMPLING, score_with="tuned")


def test_same_seed_same_answers_and_greedy_is_deterministic(comparer):
    assert comparer.compare(PROMPTS, SAMPLING) == comparer.compare(PROMPTS, SAMPLING)
    greedy = Sampling(temperature=0, max_new_tokens=8)
    a = comparer.compare(PROMPTS, greedy)
    b = comparer.compare(PROMPTS, Sampling(temperature=0, max_new_tokens=8, seed=99))
    assert a == b


def test_cli_prints_json_rows(strong_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    code = main(["compare", "--adapter", str(strong_adapter), "--prompt", PROMPTS[0], "--prompts-file", str(prompts),
                 "--max-new-tokens", "6", "--seed", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in out["rows"]] == PROMPTS[:2]
    assert set(out["rows"][0]["answers"]) == {"reference", "tuned"}
    assert out["sampling"]["max_new_tokens"] == 6 and out["adapters"][0]["label"] == "tuned"


def test_cli_text_output_shows_both_panes_with_rewards(strong_adapter, capsys):
    assert main(["compare", "--adapter", str(strong_adapter), "--prompt", PROMPTS[1], "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "[1] is it good ?" in text
    assert "reference" in text and "tuned" in text and "rewards: beta * log(pi/pi_ref)" in text


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "-1"], "temperature: must be between 0 and 5"),
    ([], "give at least one --prompt"),
    (["--prompt", "x", "--adapter", "/nonexistent/adapter"], "no such run directory or adapter folder"),
])  # fmt: skip
def test_cli_bad_arguments_exit_2_with_one_message(strong_adapter, capsys, args, message):
    assert main(["compare", "--adapter", str(strong_adapter), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_adapters_of_different_bases_are_refused(strong_adapter, tiny_llama, tmp_path, capsys):
    from tiny import save_random_adapter

    llama_adapter = save_random_adapter(tmp_path / "llama-adapter", tiny_llama)
    assert main(["compare", "--adapter", str(strong_adapter), "--adapter", str(llama_adapter), "--prompt", "x"]) == 2
    assert "different bases" in capsys.readouterr().err


def test_prompts_file_formats_and_bad_rows(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(txt) == ["first prompt", "second prompt"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert read_prompts(js) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: row 1 has no 'prompt'"):
        read_prompts(bad)


def test_a_multiline_answer_stays_in_its_column():
    comparer = SimpleNamespace(base="base", adapters=[Adapter("tuned", "a", None, 0.1)], panes=["reference", "tuned"])
    row = Row("Steps?", {"reference": "one\n\n1. two", "tuned": "three"}, {"reference": -0.25, "tuned": 1.5}, "tuned")
    lines = format_rows([row], comparer).splitlines()
    start = lines.index("[1] Steps?")
    assert lines[start + 1 :] == ["  reference    -0.250  one", "", " " * 23 + "1. two", "  tuned        +1.500  three"]
