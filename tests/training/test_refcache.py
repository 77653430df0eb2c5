"""The on-disk reference cache: a hit gives the identical table, any fingerprint change misses, a broken file
is recomputed, and a second run or a resumed run does not run the reference pass again."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lora_dpo.training.loop as trainer_module
from lora_dpo.data.fingerprint import pair_ids_digest
from lora_dpo.model.adapters import adapter_fingerprint
from lora_dpo.training import reference, refcache
from lora_dpo.config import load_recipe
from lora_dpo.data.pairs import EncodedPair
from lora_dpo.run.metrics import read_metrics
from lora_dpo.training.refcache import ReferenceCache

TIMING = ("pairs_per_s", "tokens_per_s", "peak_memory_gb")


def pairs(n=3, bump=0):
    return [EncodedPair(index=i, prompt="p", prompt_ids=[1, 2, 3 + i], chosen_ids=[4 + bump, 5], rejected_ids=[6, 7])
            for i in range(n)]


BASE = {"name": "/m", "revision": None, "commit": None, "files": "f0", "quantization": "nf4", "double_quant": True,
        "dtype": "torch.float32", "attn_implementation": "sdpa", "device": "cpu", "libraries": {"torch": "2.13.0"}}


def cache(folder, **changes):
    base = {**BASE, **changes.pop("base", {})}
    return ReferenceCache(folder, changes.pop("tokenisation", "tok0"), base, changes.pop("adapter", None))


def counting(table):
    calls = []

    def compute():
        calls.append(1)
        return table.clone()

    return compute, calls


def test_a_cache_hit_returns_the_identical_table_without_computing(tmp_path):
    table = torch.randn(3, 2)
    compute, calls = counting(table)
    first = cache(tmp_path).table(pairs(), compute)
    again = cache(tmp_path).table(pairs(), compute)
    assert len(calls) == 1
    assert torch.equal(first, table) and torch.equal(again, table)  # bit for bit


@pytest.mark.parametrize("change", [
    {"pairs": pairs(bump=1)},  # one token of one completion
    {"pairs": pairs(n=2)},  # a pair fewer
    {"tokenisation": "tok1"},
    {"base": {"name": "/other"}}, {"base": {"revision": "v2"}}, {"base": {"commit": "abc"}},
    {"base": {"files": "f1"}}, {"base": {"quantization": "none"}}, {"base": {"dtype": "torch.bfloat16"}},
    {"base": {"double_quant": False}}, {"base": {"attn_implementation": "eager"}}, {"base": {"device": "cuda"}},
    {"base": {"libraries": {"torch": "2.14.0"}}},
    {"adapter": "sft-adapter-digest"},  # the reference is an SFT adapter, not the bare base
], ids=lambda c: next(iter(c)) + ("." + next(iter(c["base"])) if "base" in c else ""))
def test_any_change_to_the_fingerprint_misses(tmp_path, change):
    compute, calls = counting(torch.randn(3, 2))
    cache(tmp_path).table(pairs(), compute)
    change = dict(change)
    these = change.pop("pairs", pairs())
    compute2, calls2 = counting(torch.randn(len(these), 2))
    cache(tmp_path, **change).table(these, compute2)
    assert calls2 == [1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_shape"])
def test_a_corrupt_or_truncated_cache_file_is_recomputed_not_fatal(tmp_path, damage, capsys):
    table = torch.randn(3, 2)
    compute, calls = counting(table)
    c = cache(tmp_path)
    c.table(pairs(), compute)
    [path] = tmp_path.glob("*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        fp = refcache.fingerprint(pair_ids_digest(pairs()), "tok0", BASE)
        path.unlink()
        from safetensors.torch import save_file

        save_file({"reference_logps": torch.zeros(4, 2)}, str(path), metadata={"fingerprint": json.dumps(fp)})
    again = c.table(pairs(), compute)
    assert calls == [1, 1] and torch.equal(again, table)
    assert "ignoring the unreadable reference cache" in capsys.readouterr().err
    assert torch.equal(c.table(pairs(), compute), table) and calls == [1, 1]  # rewritten, whole again


def test_adapter_fingerprint_follows_the_adapter_weights(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"a")
    before = adapter_fingerprint(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"b")
    assert adapter_fingerprint(tmp_path) != before
    assert adapter_fingerprint(None) is None


def test_a_second_run_and_a_resumed_run_do_not_recompute_the_reference(tmp_path, tiny_qwen2, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
                                          "rejected": f"no it is bad {i % 5}"}) for i in range(16)))
    calls = []
    compute = reference.compute_table

    def counted(method, model, pairs, *args):
        calls.append(len(pairs))
        return compute(method, model, pairs, *args)

    monkeypatch.setattr(reference, "compute_table", counted)

    def run(name, *overrides):
        recipe = load_recipe(None, [f"output_dir={tmp_path / name}", f"model.name={tiny_qwen2}", f"data.train={data}",
                                    "data.max_length=32", "data.eval_fraction=0.25", "lora.r=4", "lora.dropout=0.0",
                                    "train.batch_size=3", "train.lr=5e-3", "train.warmup_ratio=0",
                                    f"train.reference_cache={tmp_path / 'refs'}", *overrides])
        trainer_module.train(recipe)
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(tmp_path / name / "metrics.jsonl")]

    first = run("a", "train.max_steps=4")
    assert calls == [12, 4]  # train and eval tables, computed once
    assert run("b", "train.max_steps=4") == first and calls == [12, 4]  # another run: both tables from the cache
    run("a", "resume=true", "train.max_steps=6")  # a resumed run, too
    assert calls == [12, 4]
    run("c", "train.max_steps=1", "data.max_length=31")  # other token ids: a miss
    assert len(calls) == 4


COMPUTE_ONCE = """
import sys, time, torch
from lora_dpo.data.pairs import EncodedPair
from lora_dpo.training.refcache import ReferenceCache

pairs = [EncodedPair(index=i, prompt="p", prompt_ids=[1, 2, 3 + i], chosen_ids=[4, 5], rejected_ids=[6, 7]) for i in range(3)]
cache = ReferenceCache(__import__("pathlib").Path(sys.argv[1]), "tok0", {"name": "/m"}, None)

def compute():
    print("computed", flush=True)
    time.sleep(2)
    return torch.arange(6, dtype=torch.float32).reshape(3, 2)

print(cache.table(pairs, compute).sum().item())
"""


def test_runs_started_together_compute_a_table_once(tmp_path):
    """Two runs on the same data and model: one computes the reference table, the other waits and reads it."""
    procs = [subprocess.Popen([sys.executable, "-c", COMPUTE_ONCE, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(out.count("computed") for out, _ in outs) == 1
    assert [out.strip().splitlines()[-1] for out, _ in outs] == ["15.0", "15.0"]
